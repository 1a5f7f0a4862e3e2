"""Precision of the model's forward passes (DESIGN §2 "Precision"), ``model.precision``.

``float32`` (the default): fp32 with TF32 off. ``bfloat16``: every model forward of the run —
generation, the X and Y passes, the forward-mode directional pass, SNIS — under bf16 autocast
(weights stay in ``model.dtype``; the matrix products run in bf16). In both, the measure itself
(softmax, nucleus, log q, RB entropies, their logit gradients) is computed on fp32 logits and the
reductions are float64.

The X·v cross-check (reverse-mode X against the forward-mode directional sums,
:func:`entropy_probe.first_order.first_order_report`) compares two different roundings of the
same derivative, so its bound depends on the precision: :data:`CROSSCHECK_BOUNDS`.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}

# The X·v cross-check: |X·v_reverse − X·v_forward| relative to |X·v| (``relative``) and in units
# of the SE of X·v (``in_se``). A warning above ``warn`` (relative); the run stops when the
# relative difference exceeds ``fail`` and the difference exceeds ``fail_se`` standard errors
# (fp32: ``fail_se`` 0, a purely relative bound). fp32: the passes agree to ~1e-6
# (tests/test_chunked.py). bf16: measured on the embedded policy and the mid-size CPU model
# (benchmarks/precision.py, benchmarks/README.md "bf16"): see the numbers there; the bounds
# leave a factor of ~4 above the largest measured difference.
CROSSCHECK_BOUNDS = {"float32": {"warn": 1e-4, "fail": 1e-2, "fail_se": 0.0},
                     "bfloat16": {"warn": 5e-2, "fail": 0.25, "fail_se": 0.5}}


# How far bf16 moves the reported numbers from fp32 on the embedded policy, in units of the fp32
# standard errors: the bound benchmarks/README.md "bf16" states (from the measurements there) and
# tests/test_precision.py holds the small test workflow to. δH₁ at every η; ΔH (SNIS) only at
# η >= delta_h_min_eta: below it, bf16's rounding of the forward passes at θ + ηv, not the step,
# dominates ΔH (measured on the embedded policy: up to 15 SE at η <= 3e-5, 3.6 SE at 1e-4).
BF16_SHIFT_BOUNDS = {"delta_h1": 0.5, "delta_h": 2.0, "delta_h_min_eta": 3e-4}


def autocast_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of a ``model.precision`` value: None for "float32" (no autocast)."""
    if name is None or isinstance(name, torch.dtype):
        return None if name in (None, torch.float32) else name
    if name not in PRECISIONS:
        raise ValueError(f"model.precision: unknown precision {name!r} ({' | '.join(PRECISIONS)})")
    return PRECISIONS[name]


def name_of(dtype: str | torch.dtype | None) -> str:
    """The ``model.precision`` name of an autocast dtype (None = "float32")."""
    dtype = autocast_dtype(dtype)
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type, or nothing for fp32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def keeps_sampled_tokens(dtype: torch.dtype | None) -> bool:
    """Whether teacher forcing at autocast ``dtype`` keeps each sampled token in its recomputed
    nucleus (S_k ∪ {y_k}) instead of stopping the pass when y_k falls outside S_k.

    In fp32 the sampler and teacher forcing compute S_k from logits that agree to ~1e-6, and a
    token outside its recomputed nucleus means the shard was not sampled from this q: an error.
    In bf16 the logits of generation (KV cache), of the X pass (SDPA) and of the directional
    pass (fp32-accumulating attention) differ by bf16 rounding, so a token sampled at the
    boundary of S_k can fall just outside the nucleus another pass recomputes (measured: the
    embedded policy at top_p 0.95, a few tokens in 3,000). Such a token is kept, at the q of
    S_k ∪ {y_k}; the passes count these tokens and the summary reports them."""
    return dtype is not None and dtype != torch.float32


def crosscheck_bounds(name: str) -> dict:
    """The bounds of the X·v reverse/forward cross-check at precision ``name``:
    {"warn", "fail"} (relative) and "fail_se" (SEs of X·v), see :data:`CROSSCHECK_BOUNDS`."""
    if name not in CROSSCHECK_BOUNDS:
        raise ValueError(f"model.precision: unknown precision {name!r} ({' | '.join(CROSSCHECK_BOUNDS)})")
    return dict(CROSSCHECK_BOUNDS[name])


def describe(name: str) -> dict:
    """What summary.json records about the precision of a run."""
    return {"compute": name, "measure": "float32 (softmax, nucleus, log q, RB entropies)",
            "reductions": "float64", "x_dot_v_crosscheck_bounds": crosscheck_bounds(name)}
