"""Stage (update.optimizer checkpoint_diff, where model.checkpoint has its optimizer.pt): the probe's
own AdamW step from the checkpoint's optimizer state and the U batch's Y, at the learning rate of
the next step, against the step the trainer took (v = θ_{N+1} − θ_N): cosine, norm ratio, sign
agreement, and the δH₁ each predicts (lr·X·v_probe against X·v).

By hand:  python scripts/step_comparison.py CONFIG.yaml Y.safetensors X.safetensors POLICY V.safetensors OUT.json
"""
import logging

from entropy_probe import checkpoint_step, gradients, shards
from entropy_probe.stage import run_stage
from entropy_probe.update_builder import UpdateBuilder

log = logging.getLogger("step_comparison")


def main(cfg: dict, y_path: str, x_path: str, policy: str, step_path: str, out_path: str) -> None:
    y_tensors, y_meta = shards.read_shard(y_path, {"kind": "Y"})
    Y, _ = gradients.unpack(y_tensors)
    expect = {"model_fingerprint": y_meta["model_fingerprint"]}
    X, _ = gradients.unpack(shards.read_shard(x_path, expect | {"kind": "X"})[0])
    step, step_meta = shards.read_shard(step_path, expect | {"kind": "v", "optimizer": checkpoint_step.CHECKPOINT_DIFF})
    build = UpdateBuilder(cfg, policy, y_meta["model_fingerprint"], y_path, optimizer="adamw")
    v_probe = build(Y, y_path)
    lr = build.meta.get("training_lr")
    if lr is None:
        log.warning("the checkpoint's learning rate is unknown (no scheduler.pt, none logged): no norm ratio")
    result = checkpoint_step.compare_steps(v_probe, lr, step)
    x_dot_probe = gradients.dot(X, v_probe)
    result |= {"probe_delta_h1": lr * x_dot_probe if lr is not None else None, "X_dot_v_probe": x_dot_probe,
               "step_delta_h1": gradients.dot(X, step), "grad_norm": gradients.global_norm(Y),
               "clip_coef": build.describe(Y)["clip_coef"], "loss_type": y_meta.get("loss_type"),
               "checkpoint": step_meta.get("checkpoint"), "next_checkpoint": step_meta.get("next_checkpoint"),
               "optimizer_state": {k: build.meta.get(k) for k in ("optimizer_state", "optimizer_step",
                                                                   "optimizer_param_groups")}}
    shards.write_json(out_path, result)
    log.info("probe's AdamW step vs the trainer's: cosine %s, norm ratio %s, sign agreement %s; δH₁ probe %s, step %s",
             result["cosine"], result["norm_ratio"], result["sign_agreement"], result["probe_delta_h1"],
             result["step_delta_h1"])


run_stage(globals(), main, ["y_path", "x_path", "policy", "step_path", "out_path"],
          lambda smk: {"y_path": smk.input.Y, "x_path": smk.input.X, "policy": smk.input.policy,
                       "step_path": smk.input.v, "out_path": smk.output[0]}, stage="step_comparison")
