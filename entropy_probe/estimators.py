"""The estimators of DESIGN §2 as pure tensor functions: the X surrogate weights (entropy-to-go,
leave-one-out baseline) and the linearized standard errors (the GRPO (Y) coefficients are
:mod:`entropy_probe.losses`).

Shapes: B prompts, G responses each, T response positions; ``mask`` is ``[B, G, T]`` bool with
position k (0-based) valid iff k < T_i.
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor


def to_go(values: Tensor, mask: Tensor) -> Tensor:
    """Σ_{j>k} values_j over valid positions, strictly after k: ``[..., T] -> [..., T]``."""
    v = torch.where(mask, values, 0.0)
    return v.flip(-1).cumsum(-1).flip(-1) - v


def leave_one_out_mean(values: Tensor, mask: Tensor) -> Tensor:
    """b_ik = mean of values_{i'k} over the other responses i' of the same prompt with
    T_i' >= k+1 (valid at k), or 0 if there is none: ``[B, G, T] -> [B, G, T]``."""
    v = torch.where(mask, values, 0.0)
    m = mask.to(values.dtype)
    others_sum = v.sum(1, keepdim=True) - v
    others_count = m.sum(1, keepdim=True) - m
    return torch.where(others_count > 0, others_sum / others_count.clamp(min=1), 0.0)


def score_weight_parts(entropy: Tensor, mask: Tensor, normalization: str, baseline: str) -> tuple[Tensor, Tensor]:
    """(a, β) with the score-term weight w_k = a_k − H·β_k (DESIGN §2 "X = ∇H"):

    w_k = Σ_{j>k} (h_j − H) − b_k, b_k = 0 (``none``) or the leave-one-out mean of the same
    centred entropy-to-go over the prompt's other responses (``loo``); w is linear in H, hence
    the split. ``sequence`` normalization drops the centring (β = 0). Inputs ``[B, G, T]``,
    ``entropy`` detached.
    """
    a = to_go(entropy, mask)
    beta = to_go(torch.ones_like(entropy), mask) if normalization == "token" else torch.zeros_like(entropy)
    if baseline == "loo":
        a = a - leave_one_out_mean(a, mask)
        beta = beta - leave_one_out_mean(beta, mask)
    elif baseline != "none":
        raise ValueError(f"estimator.baseline: unknown baseline {baseline!r}")
    return torch.where(mask, a, 0.0), torch.where(mask, beta, 0.0)


def x_surrogate(entropy: Tensor, token_log_q: Tensor, weights: Tensor, rb_requires_grad: bool) -> Tensor:
    """Σ_i Σ_k [h_ik + w_ik log q_ik] (masked inputs, weights detached): its gradient, divided by
    ΣT (``token``) or N (``sequence``) over the whole E batch, is X. Without ``rb_requires_grad``
    the pathwise term is dropped from the gradient."""
    pathwise = entropy.sum() if rb_requires_grad else entropy.detach().sum()
    return pathwise + (weights.detach() * token_log_q).sum()


def directional_estimate(P: Tensor, Q: Tensor, S: Tensor, T: Tensor, G: int, normalization: str) -> tuple[float, float]:
    """X·u and its standard error from per-prompt-group sums (the independent units), float64.

    P_g = Σ_{i∈g} Σ_k [∂_u h_ik + a_ik ∂_u log q_ik], Q_g = Σ_{i∈g} Σ_k β_ik ∂_u log q_ik,
    S_g = Σ_{i∈g} S_i, T_g = Σ_{i∈g} T_i, each ``[n]``.

    token: f = (P̄ − H̄ Q̄)/T̄ with H̄ = S̄/T̄; the SE uses the linearized (influence) contributions
    ψ_g of all four means (treating H̄, T̄ as constants overstates it). sequence: f = P̄/G, SE =
    sd(P_g)/(G√n). SE of a mean: sd/√n.
    """
    P, Q, S, T = (x.double() for x in (P, Q, S, T))
    n = P.numel()
    if normalization == "sequence":
        estimate = P.mean() / G
        influence = (P - P.mean()) / G
    elif normalization == "token":
        Pm, Qm, Sm, Tm = P.mean(), Q.mean(), S.mean(), T.mean()
        H = Sm / Tm
        estimate = (Pm - H * Qm) / Tm
        influence = (
            (P - Pm) / Tm
            - H / Tm * (Q - Qm)
            - Qm / Tm**2 * (S - Sm)
            + (H * Qm / Tm**2 - estimate / Tm) * (T - Tm)
        )
    else:
        raise ValueError(f"estimator.normalization: unknown normalization {normalization!r}")
    if n < 2:
        raise ValueError("a standard error needs at least 2 prompt groups in the E batch")
    return float(estimate), float(influence.std(correction=1) / math.sqrt(n))


def parameter_group(name: str) -> str:
    """The module group a parameter is reported under: a transformer layer (``…layers.N``), or
    its first two name components (``model.embed_tokens``, ``lm_head``)."""
    match = re.match(r"^(.*?\.layers\.\d+)\.", name)
    if match:
        return match.group(1)
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def grouped_dot(x: dict[str, Tensor], v: dict[str, Tensor]) -> dict[str, float]:
    """Σ X·v per parameter group (float64); the values sum to the total X·v."""
    out: dict[str, float] = {}
    for name, xt in x.items():
        group = parameter_group(name)
        out[group] = out.get(group, 0.0) + float((xt.double() * v[name].double()).sum())
    return out
