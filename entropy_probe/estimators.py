"""The X estimator as pure tensor functions (DESIGN §2 "X = ∇H"): the baselines of the score
term (:data:`BASELINES`), the score-term weights (centred entropy-to-go), the per-token
coefficients of the X surrogate that every X pass differentiates, and X·u with its linearized
(influence) contributions over prompt groups, hence its standard error.

Shapes: B prompts, G responses each, T response positions; ``mask`` is ``[B, G, T]`` bool with
position k (0-based) valid iff k < T_i; per-group sums ``[n]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import normalization as norm


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


# The baselines b_k of the score term (``estimator.baseline``): a function (values, mask) of the
# other responses' values at k only (never of y_k or anything after it), ``[B, G, T] -> [B, G, T]``;
# None: no baseline. ``loo`` needs G >= 2 (checked with the config).
BASELINES = {"none": None, "loo": leave_one_out_mean}


def score_weight_parts(entropy: Tensor, mask: Tensor, normalization: str, baseline: str) -> tuple[Tensor, Tensor]:
    """(a, β) with the score-term weight w_k = a_k − H·β_k:

    w_k = Σ_{j>k} (h_j − H) − b_k, b_k the baseline (:data:`BASELINES`) of the same centred
    entropy-to-go over the prompt's other responses; w is linear in H, hence the split. A
    normalization that is not centred (``sequence``) has β = 0. Inputs ``[B, G, T]``,
    ``entropy`` detached.
    """
    if baseline not in BASELINES:
        raise ValueError(f"estimator.baseline: unknown baseline {baseline!r} ({' | '.join(BASELINES)})")
    a = to_go(entropy, mask)
    beta = to_go(torch.ones_like(entropy), mask) if norm.get(normalization).centred else torch.zeros_like(entropy)
    subtract = BASELINES[baseline]
    if subtract is not None:
        a = a - subtract(a, mask)
        beta = beta - subtract(beta, mask)
    return torch.where(mask, a, 0.0), torch.where(mask, beta, 0.0)


@dataclass
class XCoefficients:
    """Per-token coefficients of the X surrogate F = Σ_ik [c^h_ik h_ik + c^q_ik log q_ik(y_ik)],
    ``[B*G, T]`` (prompt-major rows), zero past each response's end. ∇F summed over the E batch
    and divided by the normalization's denominator (ΣT or N) is X."""

    entropy: Tensor | None  # 1 on valid tokens (the pathwise term), None without estimator.pathwise_term
    log_q: Tensor  # w_ik, the score-term weight


def x_coefficients(entropy: Tensor, lengths: Tensor, H_bar: float, normalization: str, baseline: str,
                   pathwise_term: bool) -> XCoefficients:
    """The X surrogate's coefficients from the sampling-time RB entropies ``[B, G, T]`` (equal to
    the teacher-forced ones to float tolerance, and detached either way) and lengths ``[B, G]``,
    with the whole-batch plug-in ``H_bar`` (DESIGN §2)."""
    B, G, T = entropy.shape
    mask = response_mask(lengths, T)
    a, beta = score_weight_parts(entropy.double(), mask, normalization, baseline)
    weights = (a - H_bar * beta).reshape(B * G, T)
    pathwise = mask.reshape(B * G, T).double() if pathwise_term else None
    return XCoefficients(entropy=pathwise, log_q=weights)


def surrogate_value(coefs: XCoefficients, entropy: Tensor, token_log_q: Tensor) -> Tensor:
    """F = Σ [c^h h + c^q log q] from per-token scores ``[n, T]`` (the reference form of what the
    fused gradient passes differentiate; coefficients detached)."""
    width = entropy.shape[-1]
    value = (coefs.log_q[:, :width].to(token_log_q.dtype) * token_log_q).sum()
    if coefs.entropy is not None:
        value = value + (coefs.entropy[:, :width].to(entropy.dtype) * entropy).sum()
    return value


# ------------------------------------------------------------------------- X·u and its influence

def xu_estimate(overall: Tensor) -> Tensor:
    """X·u = (P̄ − H̄ Q̄)/D̄, H̄ = S̄/D̄, from the batch means ``overall`` = (P̄, Q̄, S̄, D̄) ``[4]`` of the
    per-group sums P_g = Σ_{i∈g} Σ_k [∂_u h_ik + a_ik ∂_u log q_ik], Q_g = Σ β_ik ∂_u log q_ik (0 when
    the normalization is not centred), S_g = Σ_{i∈g} S_i and D_g = Σ_{i∈g} D_i (DESIGN §2)."""
    P, Q, S, D = overall.unbind(-1)
    return (P - S / D * Q) / D


def xu_influence(local: Tensor, overall: Tensor) -> Tensor:
    """The linearized contribution ψ of (P, Q, S, D) ``local`` ``[..., 4]`` (a group's sums, or
    the mean of a prompt's groups) to :func:`xu_estimate` at the batch means ``overall`` ``[4]``:

        ψ = [P − H̄Q − (Q̄/D̄)(S − H̄D) − X·u D] / D̄,

    the H̄ and D̄ terms included (treating them as constants overstates the SE by up to 40%);
    ψ sums to 0 over the batch's groups, and the SE of X·u is sd(ψ)/√n. Differentiable (the
    attribution's per-prompt SE differentiates it)."""
    P, Q, S, D = local.unbind(-1)
    Pb, Qb, Sb, Db = overall.unbind(-1)
    H = Sb / Db
    return (P - H * Q - Qb / Db * (S - H * D) - xu_estimate(overall) * D) / Db


def directional_contributions(P: Tensor, Q: Tensor, S: Tensor, T: Tensor, G: int,
                              normalization: str) -> tuple[float, Tensor]:
    """X·u and each prompt group's linearized contribution ψ_g ``[n]`` (:func:`xu_influence`) from
    the per-group sums of a directional pass (T_g: the group's summed lengths), float64."""
    D = norm.get(normalization).group_denominators(T, G)
    values = torch.stack([P.double(), Q.double(), S.double(), D], dim=-1)
    overall = values.mean(0)
    return float(xu_estimate(overall)), xu_influence(values, overall)


def directional_estimate(P: Tensor, Q: Tensor, S: Tensor, T: Tensor, G: int, normalization: str) -> tuple[float, float]:
    """X·u and its standard error from per-prompt-group sums ``[n]`` (the independent units)."""
    estimate, influence = directional_contributions(P, Q, S, T, G, normalization)
    return estimate, norm.standard_error(influence)
