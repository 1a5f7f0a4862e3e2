"""The step a trainer took between two checkpoints as the update vector (``update.optimizer:
checkpoint_diff``), what a checkpoint says about the step after it (the learning rate, the η that
reproduces the step), and the probe's own AdamW step compared with the trainer's.

- v = θ_{N+1} − θ_N over the probe's parameters (``model.trainable`` narrowed by
  ``model.param_filter``), differences of the stored values taken in float64, so η = 1 is the
  step the trainer took: δH₁(1) = X·v is the first-order prediction of that step, ΔH(1) by SNIS
  what it did to H with θ_N's nucleus held fixed (DESIGN §2). Every other parameter must be equal
  in the two checkpoints, else v would not be the whole step (an error naming the parameter).
- The training η: AdamW and SGD directions are per unit learning rate, so the trainer's next step
  is at η = lr of step N+1 (``scheduler.pt``: :mod:`entropy_probe.trainer_checkpoint`); for the
  checkpoint difference it is η = 1. It travels in v's metadata (``training_eta``), and the η
  sweep of every later stage includes it (:func:`entropy_probe.sweep.sweep_etas`).
- :func:`compare_steps`: the probe's AdamW v from checkpoint N's optimizer state and the U batch's
  Y, scaled by that learning rate, against the trainer's step (cosine, norm ratio, sign agreement).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from . import gradients, models, parameters
from .errors import ProbeError
from .model_config import CHECKPOINT_DIFF
from .trainer_files import FSDP_MODEL_DIR, read_layout

log = logging.getLogger(__name__)
LABELS = {CHECKPOINT_DIFF: "trainer's step (η = 1)", "adamw": "training lr", "sgd": "training lr"}


class CheckpointStepError(ValueError, ProbeError):
    """Two checkpoints whose difference is not a step of the probe's parameters."""


def training_meta(trained: dict | None, optimizer: str) -> dict:
    """v's metadata about the trainer's step from the policy spec's ``checkpoint`` entry: the
    checkpoint, the learning rate of its next step and the η at which η·v is that step (None
    when the policy is no trainer checkpoint, or its learning rate is unknown)."""
    if not trained:
        return {"training_eta": None}
    lr = trained.get("learning_rate")
    eta = 1.0 if optimizer == CHECKPOINT_DIFF else lr
    return {"checkpoint": trained, "training_lr": lr, "training_eta": eta,
            "training_eta_label": LABELS[optimizer] if eta is not None else None}


def next_spec(spec: dict, next_checkpoint: str | Path) -> dict:
    """The policy spec of the next checkpoint: the same base with the next adapter, or the next
    full model, or the same architecture with the next sharded weights (fingerprinted afresh)."""
    spec = {k: v for k, v in spec.items() if k not in ("files", "fingerprint")}
    following = Path(next_checkpoint).resolve()
    if spec.get("sharded_dir"):
        return spec | {"sharded_dir": str(following / FSDP_MODEL_DIR), "checkpoint": None}
    key = "adapter_dir" if spec["adapter_dir"] else "model_dir"
    return spec | {key: str(following), "checkpoint": None}


def checkpoint_difference(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, Tensor]:
    """v = θ_after − θ_before per parameter (float64 differences of the stored values)."""
    if set(before) != set(after):
        raise CheckpointStepError(f"the checkpoints name different parameters: {sorted(set(before) ^ set(after))[:3]}")
    return {name: after[name].detach().double().cpu() - before[name].detach().double().cpu() for name in before}


def step_vector(cfg: dict, policy: str, next_checkpoint: str) -> tuple[dict[str, Tensor], dict]:
    """(v = θ_next − θ over the probe's parameters, its metadata). Both checkpoints are loaded as
    the policy is (``model.dtype``, ``model.trainable``), on the CPU."""
    spec = models.read_spec(policy)
    dtype, trainable, name_filter = cfg["model"]["dtype"], cfg["model"]["trainable"], cfg["model"]["param_filter"]
    before_model = models.load_policy(policy, dtype, "cpu", trainable)
    after_model = models.load_policy(next_spec(spec, next_checkpoint), dtype, "cpu", trainable)
    selected = parameters.select(before_model, name_filter)
    before, after = dict(before_model.named_parameters()), dict(after_model.named_parameters())
    if set(before) != set(after):
        raise CheckpointStepError(f"update.next_checkpoint {next_checkpoint}: parameters differ from the policy's: "
                                  f"{sorted(set(before) ^ set(after))[:3]}")
    for name, theta in before.items():
        if name not in selected and not torch.equal(theta, after[name]):
            raise CheckpointStepError(
                f"update.next_checkpoint {next_checkpoint}: parameter {name!r} differs from model.checkpoint's but "
                f"is not one of the probe's parameters (model.trainable {trainable!r}, model.param_filter "
                f"{name_filter!r}): θ_next − θ over them would not be the step the trainer took")
    v = checkpoint_difference({n: before[n] for n in selected}, {n: after[n] for n in selected})
    norm = gradients.global_norm(v)
    if norm == 0:
        log.warning("the two checkpoints are equal on the probe's parameters: v = 0 (a step at learning rate 0?)")
    layout_before = read_layout(spec["checkpoint"]["path"]) if spec.get("checkpoint") else None
    layout_after = read_layout(next_checkpoint)
    meta = {"optimizer": CHECKPOINT_DIFF, "model_fingerprint": models.fingerprint(policy),
            "next_checkpoint": str(Path(next_checkpoint).resolve()),
            "next_fingerprint": models.fingerprint(next_spec(spec, next_checkpoint)),
            "next_global_step": layout_after.global_step,
            "steps_between": layout_after.global_step - layout_before.global_step if layout_before else None,
            "step_norm": norm, "max_grad_norm": 0.0} | training_meta(spec.get("checkpoint"), CHECKPOINT_DIFF)
    return v, meta


def compare_steps(v_probe: dict[str, Tensor], lr: float | None, step: dict[str, Tensor]) -> dict:
    """The probe's step lr·v_probe against the trainer's step (both keyed by the probe's
    parameters): cosine, norm ratio ‖lr·v_probe‖/‖step‖, and the share of the coordinates that
    moved where both have the same sign (AdamW steps are nearly sign-like). ``lr`` None (unknown):
    no norm ratio."""
    if set(v_probe) != set(step):
        raise CheckpointStepError(f"the probe's v and the step cover different parameters: "
                                  f"{sorted(set(v_probe) ^ set(step))[:3]}")
    probe_norm, step_norm = gradients.global_norm(v_probe), gradients.global_norm(step)
    dot = gradients.dot(v_probe, step)
    moved = agree = 0
    for name, s in step.items():
        mask = s != 0
        moved += int(mask.sum())
        agree += int((torch.sign(v_probe[name].double()) == torch.sign(s))[mask].sum())
    return {
        "learning_rate": lr,
        "cosine": dot / (probe_norm * step_norm) if probe_norm > 0 and step_norm > 0 else None,
        "norm_ratio": abs(lr) * probe_norm / step_norm if step_norm > 0 and lr is not None else None,
        "sign_agreement": agree / moved if moved else None,
        "probe_v_norm": probe_norm, "step_norm": step_norm,
    }
