"""Which parameters of the policy X, Y and v cover (``model.trainable``): ``adapters`` (what PEFT
trains: the LoRA matrices and any ``modules_to_save`` copies; the base frozen), ``all`` (every
parameter, base included) or ``auto`` (``adapters`` with an adapter, else ``all``);
``model.param_filter`` narrows the choice further (:func:`entropy_probe.parameters.select`).

Torch-free at import: the model's own methods set ``requires_grad``, so the check of a trainer
checkpoint's optimizer state can build a weightless model with the same trainable parameters.
"""
from __future__ import annotations

import logging

from .errors import ConfigError

log = logging.getLogger(__name__)

TRAINABLE_MODES = ("auto", "all", "adapters")


def trainable_mode(mode: str, has_adapter: bool) -> str:
    """``auto`` -> ``adapters`` with an adapter, else ``all``; ``adapters`` needs an adapter."""
    if mode not in TRAINABLE_MODES:
        raise ConfigError(f"model.trainable: {mode!r} is not one of {TRAINABLE_MODES}")
    if mode == "auto":
        return "adapters" if has_adapter else "all"
    if mode == "adapters" and not has_adapter:
        raise ConfigError("model.trainable: 'adapters' needs model.adapter_path")
    return mode


def set_trainable(model, mode: str, where: str) -> None:
    """``requires_grad`` per ``mode`` (after PEFT marked its own trainable parameters)."""
    if mode == "all":
        for name, param in model.named_parameters():
            param.requires_grad_(".original_module." not in name)  # PEFT's unused copies of modules_to_save
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"model.trainable: {mode!r} leaves no trainable parameter of {where}")
    total = sum(p.numel() for p in model.parameters())
    log.info("model.trainable %r: %d of %d parameter tensors trainable (%d of %d values), e.g. %s", mode,
             len(trainable), len(list(model.parameters())), sum(p.numel() for _, p in trainable), total,
             trainable[0][0])
