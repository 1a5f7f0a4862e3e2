"""The update vector v (DESIGN §2 "Y and v"; or the trainer's step between two checkpoints) and the
jackknife over U shards."""
from __future__ import annotations

from typing import Annotated

import logging

from .. import checkpoint_step, first_order, gradients, guards, losses, shards, update
from ..stage import In, Out
from ..update_builder import UpdateBuilder

log = logging.getLogger(__name__)


def write_update_from_y(cfg: dict, policy: str, Y_path: str, v_path: str, variant: str | None) -> None:
    """v of one optimizer step from the reduced Y (sgd: v = Y; adamw: one torch AdamW step from the
    optimizer state, or a fresh optimizer), scaled by a variant's lr_factor, keyed like Y, float64."""
    tensors, y_meta = shards.read_shard(Y_path, {"kind": "Y"})
    Y, _ = gradients.unpack(tensors)
    if cfg["update"]["optimizer"] == "sgd" and gradients.global_norm(Y) == 0:
        if variant is None:
            raise losses.NoSignalError(f"{Y_path}: Y = 0 (no prompt group of the U batch has a non-zero advantage), "
                                       "so with update.optimizer: sgd v = 0; see the u_objective log")
        # a variant's v = 0 is its answer (δH₁ = ΔH = 0); the main update decides whether the run stops
        log.warning("update variant %s: Y = 0 (no prompt group of the U batch has a non-zero advantage), so its "
                    "sgd step is v = 0", variant)
    build = UpdateBuilder(cfg, policy, y_meta["model_fingerprint"], Y_path)
    lr_factor = cfg["variant"]["lr_factor"] if variant else 1.0
    v = update.scaled(build(Y, Y_path), lr_factor)
    header = build.describe(Y) | {"kind": "v", "param_filter": y_meta.get("param_filter"),
                                  "loss_type": y_meta.get("loss_type"), "lr_factor": lr_factor, "variant": variant}
    guards.check_parameters(v, "update vector v", Y_path)
    shards.write_shard(v_path, v, header)
    log.info("v (%s): |v| = %.6g over %d tensors; |Y| = %.6g, clip coefficient %.6g", build.optimizer,
             gradients.global_norm(v), len(v), header["grad_norm"], header["clip_coef"])


def update_vector(cfg: dict, *, policy: Annotated[str, In("the policy directory or spec")], v: Annotated[str, Out("results/update/v.safetensors")],
                  Y: Annotated[str, In("the reduced Y, results/gradients/Y.safetensors (not with checkpoint_diff)")] = None) -> None:
    """The update vector v = Δθ/η of one optimizer step on the U batch: sgd v = Y; adamw one torch
    AdamW step from the checkpoint's optimizer state (update.optimizer_state, or model.checkpoint's
    optimizer.pt) or from a fresh optimizer, after optional clipping (update.max_grad_norm).
    checkpoint_diff: v = θ(update.next_checkpoint) − θ(model.checkpoint) over the probe's
    parameters (no Y), η = 1 the trainer's step."""
    if cfg["update"]["optimizer"] != checkpoint_step.CHECKPOINT_DIFF:
        write_update_from_y(cfg, policy, Y, v, variant=None)
        return
    following = cfg["update"]["next_checkpoint"]
    step, header = checkpoint_step.step_vector(cfg, policy, following)
    guards.check_parameters(step, "update vector v", following)
    shards.write_shard(v, step, header | {"kind": "v", "param_filter": cfg["model"]["param_filter"]})
    log.info("v = θ(%s) − θ(policy): |v| = %.6g over %d tensors (global steps %s -> %s)", following,
             header["step_norm"], len(step), (header.get("checkpoint") or {}).get("global_step"),
             header["next_global_step"])


def u_jackknife(cfg: dict, *, X: Annotated[str, In("the reduced X")], policy: Annotated[str, In("the policy directory or spec")],
                Y: Annotated[list[str], In("every Y gradient shard")], jackknife: Annotated[str, Out("results/estimates/u_jackknife.json")]) -> None:
    """Delete-one-U-shard jackknife of X·v (the U-batch noise in v that the E-side SE leaves out).
    With a single U shard it records that the jackknife is not available."""
    x_tensors, x_meta = shards.read_shard(X, {"kind": "X"})
    X_grad, _ = gradients.unpack(x_tensors)
    read = shards.read_set(Y, {"kind": "Y", "model_fingerprint": x_meta["model_fingerprint"]})
    y_shards = [(gradients.unpack(t)[0], m["normalizer_share"]) for t, m in zip(read.tensors, read.metas)]
    build = UpdateBuilder(cfg, policy, x_meta["model_fingerprint"], X) if len(y_shards) > 1 else None
    result = first_order.u_jackknife(X_grad, y_shards, build)
    shards.write_json(jackknife, result)
    log.info("%s", result)
