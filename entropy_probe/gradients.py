"""Gradient shards: partial sums per shard, keyed by parameter name, and their reduction."""
from __future__ import annotations

import torch
from torch import Tensor

STAT_PREFIX = "stat/"  # per-sequence scalars stored beside the gradients (not parameter names)


def pack(grads: dict[str, Tensor], stats: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    out = {name: g for name, g in grads.items()}
    out.update({STAT_PREFIX + k: v for k, v in (stats or {}).items()})
    return out


def unpack(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    grads = {k: v for k, v in tensors.items() if not k.startswith(STAT_PREFIX)}
    stats = {k[len(STAT_PREFIX):]: v for k, v in tensors.items() if k.startswith(STAT_PREFIX)}
    return grads, stats


def sum_shards(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Σ of per-shard gradients in float64; all shards must cover the same parameters."""
    names = set(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if set(part) != names:
            raise ValueError(f"gradient shard {i} covers other parameters than shard 0: "
                             f"{sorted(set(part) ^ names)[:3]}")
    return {name: sum(part[name].double() for part in parts) for name in sorted(names)}


def dot(x: dict[str, Tensor], v: dict[str, Tensor]) -> float:
    if set(x) != set(v):
        raise ValueError(f"X and v cover different parameters: {sorted(set(x) ^ set(v))[:3]}")
    return float(sum((x[k].double() * v[k].double()).sum() for k in x))


def global_norm(x: dict[str, Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in x.values())))
