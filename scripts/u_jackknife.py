"""Stage: delete-one-U-shard jackknife of X·v (the U-batch noise in v that the E-side SE leaves
out). With a single U shard it records that the jackknife is not available.

By hand:  python scripts/u_jackknife.py CONFIG.yaml X.safetensors POLICY_DIR OUT.json Y_SHARD...
"""
import logging

from entropy_probe import first_order, gradients, shards
from entropy_probe.stage import run_stage
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


run_stage(globals(), main, ["x_path", "policy_dir", "out_path", ("y_paths", "Y gradient shards", {"nargs": "+"})],
          lambda smk: {"x_path": smk.input.X, "policy_dir": smk.input.policy, "y_paths": list(smk.input.Y),
                       "out_path": smk.output[0]}, stage="u_jackknife")
