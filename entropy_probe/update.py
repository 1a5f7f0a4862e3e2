"""The update vector v = Δθ/η of one optimizer step on the U batch (DESIGN §2 "Y and v")."""
from __future__ import annotations

from torch import Tensor


def sgd_direction(Y: dict[str, Tensor]) -> dict[str, Tensor]:
    """SGD ascends the GRPO objective: θ' = θ + η·Y, so v = Y."""
    return {name: g.double().clone() for name, g in Y.items()}


def update_direction(optimizer: str, Y: dict[str, Tensor]) -> dict[str, Tensor]:
    if optimizer == "sgd":
        return sgd_direction(Y)
    raise ValueError(f"update.optimizer: unknown optimizer {optimizer!r}")
