"""Gradients keyed by parameter name: the partial sums of a shard, their reduction, dot products
and norms, and the per-module split of a dot product."""
from __future__ import annotations

import re

import torch
from torch import Tensor

from . import normalization

STAT_PREFIX = "stat/"  # per-sequence scalars stored beside the gradients (not parameter names)
# The X side's gradient-sized files (per-shard partial sums, the reduced X) are stored in float32:
# half the bytes of float64 at full-parameter scale; sums and dot products are float64 after
# reading, and no reported number moves beyond 1e-6 relative (tests/test_storage.py). The U side
# (Y partials, Y, v) stays float64: v's last bits decide where θ + ηv rounds to the policy's
# float32 weights, and float32 rounding of Y moved ΔH (SNIS and exact) by up to 1e-5 relative
# (measured on the default run; docs/outputs.md "Disk").
STORAGE_DTYPE = torch.float32


def storage_dtype(kind: str) -> torch.dtype:
    """The on-disk dtype of gradient-sized tensors of ``kind`` ("X", "Y" or "v")."""
    if kind not in ("X", "Y", "v"):
        raise ValueError(f"unknown gradient kind {kind!r}")
    return STORAGE_DTYPE if kind == "X" else torch.float64


def pack(grads: dict[str, Tensor], stats: dict[str, Tensor] | None = None,
         kind: str | None = None) -> dict[str, Tensor]:
    """A gradient file's tensors: the gradients in :func:`storage_dtype` of ``kind`` (None:
    float64), the per-sequence stats (``stat/`` prefix) as they are (float64)."""
    dtype = torch.float64 if kind is None else storage_dtype(kind)
    out = {name: g.to(dtype) for name, g in grads.items()}
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
    """Σ_k ⟨x_k, v_k⟩ in float64 on the CPU over the same parameters (either side may live on a
    GPU); covering different parameters is an error (:func:`restrict` one side first)."""
    if set(x) != set(v):
        raise ValueError(f"X and v cover different parameters: {sorted(set(x) ^ set(v))[:3]}")
    return float(sum((x[k].to("cpu", torch.float64) * v[k].to("cpu", torch.float64)).sum() for k in x))


def restrict(x: dict[str, Tensor], names) -> dict[str, Tensor]:
    """``x`` on the parameters ``names`` (an iterable, or a dict's keys), in their order."""
    return {k: x[k] for k in names}


def global_norm(x: dict[str, Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in x.values())))


def parameter_group(name: str) -> str:
    """The module group a parameter is reported under: a transformer layer (``…layers.N``), or
    its first two name components (``model.embed_tokens``, ``lm_head``)."""
    match = re.match(r"^(.*?\.layers\.\d+)\.", name)
    if match:
        return match.group(1)
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def grouped_dot(x: dict[str, Tensor], v: dict[str, Tensor]) -> dict[str, float]:
    """Σ x·v per parameter group (float64); the values sum to the total x·v."""
    out: dict[str, float] = {}
    for name, xt in x.items():
        group = parameter_group(name)
        out[group] = out.get(group, 0.0) + float((xt.double() * v[name].double()).sum())
    return out


def reduce_shards(kind: str, parts: list[tuple[dict[str, Tensor], dict]]) -> tuple[dict[str, Tensor], dict, float]:
    """The whole-batch gradient from its shards (unpacked gradient and stats, metadata each):
    Σ shards / normalizer, with normalizer = ΣT (X, ``token``) or N (X, ``sequence``) over the
    whole E batch (DESIGN §2 "X = ∇H"), or the loss type's normalizer Z = Σ shares (Y,
    :mod:`entropy_probe.losses`). Returns (gradient, concatenated per-sequence stats, normalizer)."""
    total = sum_shards([grads for (grads, _), _ in parts])
    if kind == "X":
        stats = {"T": torch.cat([s["T"] for (_, s), _ in parts])}
        normalizer = normalization.get(parts[0][1]["normalization"]).x_denominator(stats["T"])
    elif kind == "Y":
        stats, normalizer = {}, sum(meta["normalizer_share"] for _, meta in parts)
    else:
        raise ValueError(f"unknown gradient kind {kind!r}")
    return {name: g / normalizer for name, g in total.items()}, stats, normalizer
