"""Numerical guards: a non-finite value stops the job with what, where and which element
(no ``nan_to_num``: a NaN that reached an estimate would be silently wrong)."""
from __future__ import annotations

import torch
from torch import Tensor

from .errors import ProbeError


class NonFiniteError(FloatingPointError, ProbeError):
    """A NaN or inf in a logit-derived quantity, a gradient, or a weight."""


def check_parameters(tensors: dict[str, Tensor], what: str, where: str) -> None:
    """Every tensor of a name -> tensor dict is finite; else name the first bad parameter."""
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise NonFiniteError(f"{where}: {what} of parameter {name!r} has {bad} non-finite values")


def check_sequences(values: Tensor, what: str, where: str, sequence_ids: Tensor | None = None) -> None:
    """``values`` ``[N, ...]`` per sequence: name the first sequence (row b*G+g of its shard, or
    ``sequence_ids[row]``) holding a non-finite value."""
    finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(-1)
    if not finite.all():
        row = int((~finite).nonzero()[0])
        label = int(sequence_ids[row]) if sequence_ids is not None else row
        raise NonFiniteError(f"{where}: {what} is non-finite for sequence {label} "
                             f"({int((~finite).sum())} of {values.shape[0]} sequences affected)")
