"""Stage: the update vector v = Δθ/η of one optimizer step from the reduced Y gradient
(DESIGN §2 "Y and v"). sgd: v = Y; adamw: one torch AdamW step from the checkpoint's optimizer
state (update.optimizer_state) or, with none, from a fresh optimizer. Optional clipping of the
gradient by global norm (update.max_grad_norm). v is keyed like Y, in float64.

By hand:  python scripts/update_vector.py CONFIG.yaml Y.safetensors POLICY_DIR OUT.safetensors
"""
import logging

from entropy_probe import gradients, guards, losses, shards
from entropy_probe.stage import run_stage
from entropy_probe.update_builder import UpdateBuilder

log = logging.getLogger("update_vector")


def main(cfg: dict, y_path: str, policy_dir: str, out_path: str) -> None:
    tensors, y_meta = shards.read_shard(y_path, {"kind": "Y"})
    Y, _ = gradients.unpack(tensors)
    if cfg["update"]["optimizer"] == "sgd" and gradients.global_norm(Y) == 0:
        raise losses.NoSignalError(f"{y_path}: Y = 0 (no prompt group of the U batch has a non-zero advantage), so "
                                   "with update.optimizer: sgd v = 0; see the u_objective log")
    build = UpdateBuilder(cfg, policy_dir, y_meta["model_fingerprint"], y_path)
    v = build(Y, y_path)
    meta = build.describe(Y) | {"kind": "v", "param_filter": y_meta.get("param_filter"),
                                "loss_type": y_meta.get("loss_type")}
    guards.check_parameters(v, "update vector v", y_path)
    shards.write_shard(out_path, v, meta)
    log.info("v (%s): |v| = %.6g over %d tensors; |Y| = %.6g, clip coefficient %.6g", build.optimizer,
             gradients.global_norm(v), len(v), meta["grad_norm"], meta["clip_coef"])


run_stage(globals(), main, ["y_path", "policy_dir", "out_path"],
          lambda smk: {"y_path": smk.input.Y, "policy_dir": smk.input.policy, "out_path": smk.output[0]},
          stage="update_vector")
