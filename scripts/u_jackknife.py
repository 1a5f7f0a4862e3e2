"""Stage: delete-one-U-shard jackknife of X·v (the U-batch noise in v that the E-side SE leaves
out). With a single U shard it records that the jackknife is not available.

By hand:  python scripts/u_jackknife.py CONFIG.yaml X.safetensors POLICY_DIR OUT.json Y_SHARD...
"""
import argparse
import logging

from entropy_probe import first_order, gradients, shards
from entropy_probe.stage import config_for, rule_config, stage_run
from entropy_probe.update_builder import UpdateBuilder


def main(cfg: dict, x_path: str, policy_dir: str, y_paths: list[str], out_path: str) -> None:
    x_tensors, x_meta = shards.read_shard(x_path, {"kind": "X"})
    X, _ = gradients.unpack(x_tensors)
    expect = {"kind": "Y", "model_fingerprint": x_meta["model_fingerprint"]}
    loaded = [shards.read_shard(p, expect) for p in y_paths]
    y_shards = [(gradients.unpack(t)[0], m["normalizer_share"]) for t, m in loaded]
    build = UpdateBuilder(cfg, policy_dir, x_meta["model_fingerprint"], x_path) if len(y_shards) > 1 else None
    result = first_order.u_jackknife(X, y_shards, build)
    shards.write_json(out_path, result)
    logging.getLogger("u_jackknife").info("%s", result)


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        main(rule_config(snakemake), snakemake.input.X, snakemake.input.policy, list(snakemake.input.Y),  # noqa: F821
             snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("x")
    parser.add_argument("policy_dir")
    parser.add_argument("out")
    parser.add_argument("y_shards", nargs="+")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "u_jackknife"), args.x, args.policy_dir, args.y_shards, args.out)
