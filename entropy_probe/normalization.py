"""The estimand's normalization (DESIGN §2 "Estimand"): H = E[S] / E[D] with D = T (``token``,
nats per token) or D = 1 (``sequence``, nats per response). Every ratio of the probe — the
whole-batch plug-in H̄, X's denominator and centring, the SNIS and fresh-rollout estimates of
H(θ'), the exact reference — goes through the one :class:`Normalization` of the run, and every
standard error of such a ratio through :func:`ratio_influence` (prompt groups as the units).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Normalization:
    """One way of normalizing the entropy. ``centred``: the score-term weights are centred by H
    (w_k = Σ_{j>k}(h_j − H) − b_k); true exactly when D = T (DESIGN §2 "X = ∇H")."""

    name: str
    unit: str
    per_token: bool

    @property
    def centred(self) -> bool:
        return self.per_token

    def denominators(self, lengths: Tensor) -> Tensor:
        """D_i per response: T_i (``token``) or 1 (``sequence``), float64, same shape."""
        lengths = lengths.double()
        return lengths if self.per_token else torch.ones_like(lengths)

    def ratio(self, S: Tensor, lengths: Tensor, weights: Tensor | None = None) -> float:
        """Σ w S / Σ w D over responses (w = 1 by default): the plug-in H̄ or a weighted H(θ')."""
        D = self.denominators(lengths)
        S = S.double()
        if weights is not None:
            S, D = weights * S, weights * D
        return float(S.sum() / D.sum())

    def x_denominator(self, lengths: Tensor) -> float:
        """What the summed X surrogate gradient is divided by: ΣT (``token``) or N (``sequence``)."""
        return float(self.denominators(lengths).sum())


NORMALIZATIONS = {
    "token": Normalization("token", "nats/token", per_token=True),
    "sequence": Normalization("sequence", "nats/response", per_token=False),
}


def get(name: str) -> Normalization:
    if name not in NORMALIZATIONS:
        raise ValueError(f"estimator.normalization: unknown normalization {name!r} ({' | '.join(NORMALIZATIONS)})")
    return NORMALIZATIONS[name]


def batch_plugins(S: Tensor, lengths: Tensor) -> dict:
    """Whole-E-batch plug-ins from per-response S_i and T_i (never per shard, DESIGN §2): H̄ for
    both normalizations, T̄ and the counts."""
    S, T = S.double(), lengths.double()
    return {"H_bar_token": float(S.sum() / T.sum()), "H_bar_sequence": float(S.mean()), "sum_S": float(S.sum()),
            "sum_T": float(T.sum()), "num_sequences": int(S.numel()), "mean_T": float(T.mean())}


def ratio_influence(A: Tensor, B: Tensor) -> tuple[float, Tensor]:
    """R = ΣA/ΣB over prompt groups (``[n]`` each) and its linearized contributions
    ψ_g = (A_g − R·B_g)/B̄: the SE of R is sd(ψ)/√n (DESIGN §2 "Error bars")."""
    A, B = A.double(), B.double()
    R = A.sum() / B.sum()
    return float(R), (A - R * B) / B.mean()


def directional_influence(P: Tensor, Q: Tensor, S: Tensor, D: Tensor) -> tuple[float, Tensor]:
    """X·u = (P̄ − H̄ Q̄)/D̄ with H̄ = S̄/D̄ from per-prompt-group sums ``[n]`` (DESIGN §2):
    P_g = Σ_{i∈g} Σ_k [∂_u h_ik + a_ik ∂_u log q_ik], Q_g = Σ_{i∈g} Σ_k β_ik ∂_u log q_ik (0 when
    the normalization is not centred), S_g and D_g the group's sums of S_i and D_i. Returns the
    estimate and its linearized (influence) contributions ψ_g, including the H̄ and D̄ terms
    (treating them as constants overstates the SE by up to 40%)."""
    P, Q, S, D = (x.double() for x in (P, Q, S, D))
    Pm, Qm, Sm, Dm = P.mean(), Q.mean(), S.mean(), D.mean()
    H = Sm / Dm
    estimate = (Pm - H * Qm) / Dm
    influence = ((P - Pm) / Dm - H / Dm * (Q - Qm) - Qm / Dm**2 * (S - Sm)
                 + (H * Qm / Dm**2 - estimate / Dm) * (D - Dm))
    return float(estimate), influence


def standard_error(influence: Tensor) -> float:
    """sd(ψ)/√n of per-group influence contributions (the SE of a mean over n groups)."""
    n = influence.numel()
    if n < 2:
        raise ValueError("a standard error needs at least 2 prompt groups")
    return float(influence.std(correction=1) / math.sqrt(n))


def group_sums(values: Tensor, G: int) -> Tensor:
    """Per-prompt-group sums ``[B*G] -> [B]`` of prompt-major per-response values (float64)."""
    return values.double().reshape(-1, G).sum(-1)
