"""Stage: the whole-batch X or Y gradient from its shards (entropy_probe.gradients.reduce_shards).

By hand:  python scripts/reduce_gradients.py {X,Y} OUT.safetensors SHARD...
"""
import argparse
import logging

from entropy_probe import gradients, shards
from entropy_probe.stage import stage_run

log = logging.getLogger("reduce_gradients")
SHARED_KEYS = ("model_fingerprint", "param_filter", "normalization", "baseline", "H_bar", "loss_type", "entropy")


def main(kind: str, shard_paths: list[str], out_path: str) -> None:
    loaded = [shards.read_shard(p, {"kind": kind}) for p in shard_paths]
    metas = [meta for _, meta in loaded]
    for key in SHARED_KEYS:
        values = {repr(m.get(key)) for m in metas}
        if len(values) > 1:
            raise shards.ShardError(f"{kind} gradient shards disagree on {key}: {sorted(values)}")
    reduced, stats, normalizer = gradients.reduce_shards(kind, [(gradients.unpack(t), m) for t, m in loaded])
    meta = {k: v for k, v in metas[0].items() if k not in ("schema_version", "normalizer_share")}
    shards.write_shard(out_path, gradients.pack(reduced, stats), meta | {"normalizer": normalizer, "num_shards": len(metas)})
    log.info("%s = Σ of %d shards / %.6g; |%s| = %.6g", kind, len(metas), normalizer, kind, gradients.global_norm(reduced))


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        main(snakemake.wildcards.kind, list(snakemake.input), snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["X", "Y"])
    parser.add_argument("out")
    parser.add_argument("shards", nargs="+")
    args = parser.parse_args()
    with stage_run():
        main(args.kind, args.shards, args.out)
