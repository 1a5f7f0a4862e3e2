"""The X estimator of DESIGN §2 ("X = ∇H") as pure tensor functions: the score-term weights
(centred entropy-to-go, leave-one-out baseline), the per-token coefficients of the X surrogate
that every X pass differentiates, and X·u with its standard error from per-prompt-group sums.

Shapes: B prompts, G responses each, T response positions; ``mask`` is ``[B, G, T]`` bool with
position k (0-based) valid iff k < T_i.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import normalization as norm

BASELINES = ("none", "loo")


def response_mask(lengths: Tensor, width: int) -> Tensor:
    """``[..., T]`` bool: position k < T_i (``lengths`` ``[...]``)."""
    return torch.arange(width, device=lengths.device) < lengths[..., None]


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
    """(a, β) with the score-term weight w_k = a_k − H·β_k:

    w_k = Σ_{j>k} (h_j − H) − b_k, b_k = 0 (``none``) or the leave-one-out mean of the same
    centred entropy-to-go over the prompt's other responses (``loo``); w is linear in H, hence
    the split. A normalization that is not centred (``sequence``) has β = 0. Inputs
    ``[B, G, T]``, ``entropy`` detached.
    """
    a = to_go(entropy, mask)
    beta = to_go(torch.ones_like(entropy), mask) if norm.get(normalization).centred else torch.zeros_like(entropy)
    if baseline == "loo":
        a = a - leave_one_out_mean(a, mask)
        beta = beta - leave_one_out_mean(beta, mask)
    elif baseline != "none":
        raise ValueError(f"estimator.baseline: unknown baseline {baseline!r} ({' | '.join(BASELINES)})")
    return torch.where(mask, a, 0.0), torch.where(mask, beta, 0.0)


@dataclass
class XCoefficients:
    """Per-token coefficients of the X surrogate F = Σ_ik [c^h_ik h_ik + c^q_ik log q_ik(y_ik)],
    ``[B*G, T]`` (prompt-major rows), zero past each response's end. ∇F summed over the E batch
    and divided by the normalization's denominator (ΣT or N) is X."""

    entropy: Tensor | None  # 1 on valid tokens (the pathwise term), None without rb_requires_grad
    log_q: Tensor  # w_ik, the score-term weight


def x_coefficients(entropy: Tensor, lengths: Tensor, H_bar: float, normalization: str, baseline: str,
                   rb_requires_grad: bool) -> XCoefficients:
    """The X surrogate's coefficients from the sampling-time RB entropies ``[B, G, T]`` (equal to
    the teacher-forced ones to float tolerance, and detached either way) and lengths ``[B, G]``,
    with the whole-batch plug-in ``H_bar`` (DESIGN §2)."""
    B, G, T = entropy.shape
    mask = response_mask(lengths, T)
    a, beta = score_weight_parts(entropy.double(), mask, normalization, baseline)
    weights = (a - H_bar * beta).reshape(B * G, T)
    pathwise = mask.reshape(B * G, T).double() if rb_requires_grad else None
    return XCoefficients(entropy=pathwise, log_q=weights)


def surrogate_value(coefs: XCoefficients, entropy: Tensor, token_log_q: Tensor) -> Tensor:
    """F = Σ [c^h h + c^q log q] from per-token scores ``[n, T]`` (the reference form of what the
    fused gradient passes differentiate; coefficients detached)."""
    width = entropy.shape[-1]
    value = (coefs.log_q[:, :width].to(token_log_q.dtype) * token_log_q).sum()
    if coefs.entropy is not None:
        value = value + (coefs.entropy[:, :width].to(entropy.dtype) * entropy).sum()
    return value


def directional_estimate(P: Tensor, Q: Tensor, S: Tensor, T: Tensor, G: int, normalization: str) -> tuple[float, float]:
    """X·u and its standard error from per-prompt-group sums ``[n]`` (the independent units),
    float64: P_g = Σ_{i∈g} Σ_k [∂_u h_ik + a_ik ∂_u log q_ik], Q_g = Σ_{i∈g} Σ_k β_ik ∂_u log q_ik,
    S_g, T_g the group's sums of S_i and T_i (see :func:`normalization.directional_influence`)."""
    estimate, influence = directional_contributions(P, Q, S, T, G, normalization)
    return estimate, norm.standard_error(influence)


def directional_contributions(P: Tensor, Q: Tensor, S: Tensor, T: Tensor, G: int,
                              normalization: str) -> tuple[float, Tensor]:
    """X·u and each prompt group's linearized contribution ψ_g (the SE's units; they sum to 0)."""
    per_token = norm.get(normalization).per_token
    D = T.double() if per_token else torch.full_like(T, G, dtype=torch.float64)
    return norm.directional_influence(P, Q, S, D)
