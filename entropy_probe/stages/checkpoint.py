"""Trainer checkpoints: the probe's own AdamW step against the step the trainer took."""
from __future__ import annotations

from typing import Annotated

import logging

from .. import checkpoint_step, first_order, gradients, shards
from ..stage import In, Out
from ..update_builder import UpdateBuilder

log = logging.getLogger(__name__)


def step_comparison(cfg: dict, *, Y: Annotated[str, In("the reduced Y of the probe's U batch")], X: Annotated[str, In("the reduced X")],
                    policy: Annotated[str, In("the policy spec (the trainer checkpoint)")],
                    v: Annotated[str, In("the trainer's step, results/update/v.safetensors (checkpoint_diff)")],
                    comparison: Annotated[str, Out("results/update/step_comparison.json")]) -> None:
    """With update.optimizer checkpoint_diff, where model.checkpoint has its optimizer.pt: the
    probe's own AdamW step from the checkpoint's optimizer state and the U batch's Y, at the
    learning rate of the next step, against the step the trainer took (v = θ_{N+1} − θ_N):
    cosine, norm ratio, sign agreement, and the δH₁ each predicts (lr·X·v_probe against X·v)."""
    y_tensors, y_meta = shards.read_shard(Y, {"kind": "Y"})
    Y_grad, _ = gradients.unpack(y_tensors)
    expect = {"model_fingerprint": y_meta["model_fingerprint"]}
    X_grad, _ = gradients.unpack(shards.read_shard(X, expect | {"kind": "X"})[0])
    step, step_meta = shards.read_shard(v, expect | {"kind": "v", "optimizer": checkpoint_step.CHECKPOINT_DIFF})
    build = UpdateBuilder(cfg, policy, y_meta["model_fingerprint"], Y, optimizer="adamw")
    v_probe = build(Y_grad, Y)
    lr = build.meta.get("training_lr")
    if lr is None:
        log.warning("the checkpoint's learning rate is unknown (no scheduler.pt, none logged): no norm ratio")
    result = checkpoint_step.compare_steps(v_probe, lr, step)
    x_dot_probe = gradients.dot(X_grad, v_probe)
    probe_delta_h1 = first_order.delta_h1(lr, x_dot_probe)["delta_h1"] if lr is not None else None
    result |= {"probe_delta_h1": probe_delta_h1, "X_dot_v_probe": x_dot_probe,
               "step_delta_h1": first_order.delta_h1(1.0, gradients.dot(X_grad, step))["delta_h1"],
               "grad_norm": gradients.global_norm(Y_grad),
               "clip_coef": build.describe(Y_grad)["clip_coef"], "loss_type": y_meta.get("loss_type"),
               "checkpoint": step_meta.get("checkpoint"), "next_checkpoint": step_meta.get("next_checkpoint"),
               "optimizer_state": {k: build.meta.get(k) for k in ("optimizer_state", "optimizer_step",
                                                                   "optimizer_param_groups")}}
    shards.write_json(comparison, result)
    log.info("probe's AdamW step vs the trainer's: cosine %s, norm ratio %s, sign agreement %s; δH₁ probe %s, step %s",
             result["cosine"], result["norm_ratio"], result["sign_agreement"], result["probe_delta_h1"],
             result["step_delta_h1"])
