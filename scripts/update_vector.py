"""Stage: the update vector v = Δθ/η of one optimizer step from the reduced Y gradient
(DESIGN §2 "Y and v"). sgd: v = Y; adamw: one torch AdamW step from the checkpoint's optimizer
state (update.optimizer_state, or model.checkpoint's optimizer.pt) or, with none, from a fresh
optimizer. Optional clipping of the gradient by global norm (update.max_grad_norm). v is keyed
like Y, in float64. checkpoint_diff: v = θ(update.next_checkpoint) − θ(model.checkpoint) over the
probe's parameters (no Y), η = 1 the trainer's step. For a variant of the update
(update.variants, its rule variant_update_vector) v is also scaled by its lr_factor.

By hand:  python scripts/update_vector.py CONFIG.yaml Y.safetensors POLICY_DIR OUT.safetensors
          python scripts/update_vector.py CONFIG.yaml - POLICY OUT.safetensors   (checkpoint_diff)
"""
import logging

from entropy_probe import checkpoint_step, gradients, guards, losses, shards
from entropy_probe.stage import run_stage
from entropy_probe.update_builder import UpdateBuilder

log = logging.getLogger("update_vector")


def main(cfg: dict, y_path: str | None, policy_dir: str, out_path: str, lr_factor: float = 1.0) -> None:
    variant = cfg.get("variant", {}).get("name")  # a variant's rule only (update.variants)
    lr_factor = cfg["variant"]["lr_factor"] if variant else lr_factor
    y_path = None if y_path == "-" else y_path
    if cfg["update"]["optimizer"] == checkpoint_step.CHECKPOINT_DIFF:
        following = cfg["update"]["next_checkpoint"]
        v, meta = checkpoint_step.step_vector(cfg, policy_dir, following)
        guards.check_parameters(v, "update vector v", following)
        shards.write_shard(out_path, v, meta | {"kind": "v", "param_filter": cfg["estimator"]["param_filter"]})
        log.info("v = θ(%s) − θ(policy): |v| = %.6g over %d tensors (global steps %s -> %s)", following,
                 meta["step_norm"], len(v), (meta.get("checkpoint") or {}).get("global_step"), meta["next_global_step"])
        return
    tensors, y_meta = shards.read_shard(y_path, {"kind": "Y"})
    Y, _ = gradients.unpack(tensors)
    if cfg["update"]["optimizer"] == "sgd" and gradients.global_norm(Y) == 0:
        if variant is None:
            raise losses.NoSignalError(f"{y_path}: Y = 0 (no prompt group of the U batch has a non-zero advantage), "
                                       "so with update.optimizer: sgd v = 0; see the u_objective log")
        # a variant's v = 0 is its answer (δH₁ = ΔH = 0); the main update decides whether the run stops
        log.warning("update variant %s: Y = 0 (no prompt group of the U batch has a non-zero advantage), so its "
                    "sgd step is v = 0", variant)
    build = UpdateBuilder(cfg, policy_dir, y_meta["model_fingerprint"], y_path)
    v = build(Y, y_path)
    if lr_factor != 1.0:
        v = {name: lr_factor * t for name, t in v.items()}
    meta = build.describe(Y) | {"kind": "v", "param_filter": y_meta.get("param_filter"),
                                "loss_type": y_meta.get("loss_type"), "lr_factor": lr_factor, "variant": variant}
    guards.check_parameters(v, "update vector v", y_path)
    shards.write_shard(out_path, v, meta)
    log.info("v (%s): |v| = %.6g over %d tensors; |Y| = %.6g, clip coefficient %.6g", build.optimizer,
             gradients.global_norm(v), len(v), meta["grad_norm"], meta["clip_coef"])


run_stage(globals(), main, [("y_path", "Y gradient ('-' for checkpoint_diff)"), "policy_dir", "out_path",
                            ("--lr_factor", "scale v (a variant's lr_factor)", {"type": float, "default": 1.0})],
          lambda smk: {"y_path": smk.input.get("Y"), "policy_dir": smk.input.policy, "out_path": smk.output[0]},
          stage="update_vector")
