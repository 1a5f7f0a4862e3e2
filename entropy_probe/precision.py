"""Precision of the forward passes (DESIGN §2 "Precision"): fp32 with TF32 off unless the user
asks for autocast (``generation.autocast_dtype``); the measure itself is always computed on fp32
logits and reductions are float64."""
from __future__ import annotations

import contextlib

import torch


def autocast_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of ``generation.autocast_dtype``: None for "float32" (no autocast)."""
    if name is None or isinstance(name, torch.dtype):
        return None if name in (None, torch.float32) else name
    dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"generation.autocast_dtype: unknown dtype {name!r} (float32 | bfloat16 | float16)")
    return dtypes[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type, or nothing for fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

