"""Stage: the update vector v from the reduced Y gradient (SGD: v = Y).

By hand:  python scripts/update_vector.py CONFIG.yaml Y.safetensors OUT.safetensors
"""
import argparse
import logging

from entropy_probe import gradients, shards
from entropy_probe.config import load_config
from entropy_probe.stage import setup_logging
from entropy_probe.update import update_direction


def main(cfg: dict, y_path: str, out_path: str) -> None:
    tensors, meta = shards.read_shard(y_path, {"kind": "Y"})
    Y, _ = gradients.unpack(tensors)
    v = update_direction(cfg["update"]["optimizer"], Y)
    shards.write_shard(out_path, v, {"kind": "v", "optimizer": cfg["update"]["optimizer"],
                                     "model_fingerprint": meta["model_fingerprint"]})
    logging.getLogger("update_vector").info("v (%s): |v| = %.6g over %d tensors", cfg["update"]["optimizer"],
                                            gradients.global_norm(v), len(v))


if "snakemake" in globals():
    setup_logging(snakemake.log[0])  # noqa: F821
    main(snakemake.params.cfg, snakemake.input[0], snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("y")
    parser.add_argument("out")
    args = parser.parse_args()
    setup_logging()
    main(load_config(args.config), args.y, args.out)
