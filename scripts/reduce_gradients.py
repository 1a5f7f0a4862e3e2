"""Stage: the whole-batch X or Y gradient from its shards (entropy_probe.gradients.reduce_shards).

By hand:  python scripts/reduce_gradients.py {X,Y} OUT.safetensors SHARD...
"""
import logging

from entropy_probe import gradients, shards
from entropy_probe.stage import run_stage

log = logging.getLogger("reduce_gradients")
SHARED_KEYS = ("model_fingerprint", "param_filter", "normalization", "baseline", "H_bar", "loss_type", "precision",
               "entropy")


def main(kind: str, shard_paths: list[str], out_path: str) -> None:
    loaded = [shards.read_shard(p, {"kind": kind}) for p in shard_paths]
    metas = [meta for _, meta in loaded]
    for key in SHARED_KEYS:
        values = {repr(m.get(key)) for m in metas}
        if len(values) > 1:
            raise shards.ShardError(f"{kind} gradient shards disagree on {key}: {sorted(values)}")
    reduced, stats, normalizer = gradients.reduce_shards(kind, [(gradients.unpack(t), m) for t, m in loaded])
    meta = {k: v for k, v in metas[0].items()
            if k not in ("schema_version", "normalizer_share", "tokens_outside_recomputed_nucleus")}
    if any("tokens_outside_recomputed_nucleus" in m for m in metas):
        meta["tokens_outside_recomputed_nucleus"] = sum(m.get("tokens_outside_recomputed_nucleus", 0) for m in metas)
    shards.write_shard(out_path, gradients.pack(reduced, stats, kind), meta | {"normalizer": normalizer, "num_shards": len(metas)})
    log.info("%s = Σ of %d shards / %.6g; |%s| = %.6g", kind, len(metas), normalizer, kind, gradients.global_norm(reduced))


run_stage(globals(), main, [("kind", "X or Y", {"choices": ["X", "Y"]}), "out_path", ("shard_paths", "gradient shards", {"nargs": "+"})],
          lambda smk: {"kind": smk.wildcards.kind, "shard_paths": list(smk.input), "out_path": smk.output[0]})
