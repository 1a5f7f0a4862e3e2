"""Which parameters count (DESIGN §2 "Only the trainable parameters count") and the parameter
points θ + η·v the passes evaluate, for every stage and the exact reference alike."""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn


def select(model: nn.Module, name_filter: str = "") -> dict[str, nn.Parameter]:
    """The parameters X, Y and v cover: the trainable ones (``requires_grad``, set by
    ``model.trainable`` when the policy is loaded) whose name matches ``name_filter``
    (``model.param_filter``, a regex; "" = all), in the model's own order. The others are
    frozen for the pass, which also spares their gradient computation."""
    pattern = re.compile(name_filter) if name_filter else None
    chosen = {}
    for name, param in model.named_parameters():
        if param.requires_grad and (pattern is None or pattern.search(name) is not None):
            chosen[name] = param
        else:
            param.requires_grad_(False)
    if not chosen:
        raise ValueError(f"model.param_filter: {name_filter!r} matches no trainable parameter")
    return chosen


def shifted(model: nn.Module, direction: dict[str, Tensor], eta: float) -> dict[str, Tensor]:
    """{name: θ + η·direction} for the parameters named in ``direction`` (the sum in float64, cast
    back to the parameter's dtype and kept on its device); the others are left to the model.
    For ``torch.func.functional_call``: the model itself is never modified."""
    own = dict(model.named_parameters())
    unknown = sorted(set(direction) - set(own))
    if unknown:
        raise KeyError(f"the direction names parameters the policy lacks: {unknown[:3]}")
    return {name: (own[name].detach().double() + eta * d.detach().to(own[name].device, torch.float64)).to(own[name].dtype)
            for name, d in direction.items()}


class _Holder(nn.Module):
    """Runs a function while ``functional_call`` has put other parameters into the model it holds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn()


def call_at(model: nn.Module, params: dict[str, Tensor], fn):
    """``fn()`` with the model's parameters named in ``params`` replaced by those tensors (e.g.
    :func:`shifted`) for the duration of the call, via ``torch.func.functional_call``: anything
    ``fn`` runs on ``model`` — ``generate`` included, not only ``forward`` — sees θ', and the
    model itself is never written (its own tensors are back in place when the call returns or
    raises). Tied parameters follow the one named."""
    return torch.func.functional_call(_Holder(model), {f"model.{k}": t for k, t in params.items()}, (fn,))
