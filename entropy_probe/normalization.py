"""The estimand's normalization (DESIGN §2 "Estimand"): H = E[S] / E[D] with D = T (``token``,
nats per token) or D = 1 (``sequence``, nats per response), and the ratios of the probe. Every
ratio — the whole-batch plug-in H̄, X's denominator and centring, the SNIS and fresh-rollout
estimates of H(θ'), the exact reference — goes through the one :class:`Normalization` of the run,
and every standard error of such a ratio through :func:`ratio_influence` (prompt groups as the
units).

Shapes: per-response values ``[N]`` prompt-major (b·G + g), per-group values ``[n]``, N = n·G.
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

    def group_denominators(self, length_sums: Tensor, group_size: int) -> Tensor:
        """D_g = Σ_{i∈g} D_i per prompt group from the groups' summed lengths ``[n]``: the lengths
        themselves (``token``) or the group size (``sequence``), float64."""
        return length_sums.double() if self.per_token else torch.full_like(length_sums, group_size,
                                                                            dtype=torch.float64)

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


def plugin_entropy(S: Tensor, lengths: Tensor, normalization: str) -> float:
    """The plug-in entropy H̄ = ΣS/ΣD of per-response S_i and T_i (any shape, the same)."""
    return float(S.double().sum() / get(normalization).denominators(lengths).sum())


def batch_plugins(S: Tensor, lengths: Tensor) -> dict:
    """Whole-E-batch plug-ins from per-response S_i and T_i ``[N]`` (never per shard, DESIGN §2):
    H̄ of both normalizations, T̄ and the counts."""
    return {"H_bar_token": plugin_entropy(S, lengths, "token"), "H_bar_sequence": plugin_entropy(S, lengths, "sequence"),
            "sum_S": float(S.double().sum()), "sum_T": float(lengths.double().sum()), "num_sequences": int(S.numel()),
            "mean_T": float(lengths.double().mean())}


def ratio_influence(A: Tensor, B: Tensor) -> tuple[float, Tensor]:
    """R = ΣA/ΣB over prompt groups (``[n]`` each) and its linearized contributions
    ψ_g = (A_g − R·B_g)/B̄: the SE of R is sd(ψ)/√n (DESIGN §2 "Error bars")."""
    A, B = A.double(), B.double()
    R = A.sum() / B.sum()
    return float(R), (A - R * B) / B.mean()


def plugin_with_influence(S: Tensor, lengths: Tensor, G: int, normalization: str,
                          weights: Tensor | None = None) -> tuple[float, Tensor]:
    """The plug-in entropy H̄ = Σ w S / Σ w D of per-response ``S`` and ``lengths`` ``[N]``
    (weights w ``[N]``, default 1: the SNIS estimate of H(θ') weighs) and its per-prompt-group
    linearized contributions ψ ``[n]`` (:func:`ratio_influence`)."""
    S, D = S.double(), get(normalization).denominators(lengths)
    if weights is not None:
        S, D = weights * S, weights * D
    return ratio_influence(group_sums(S, G), group_sums(D, G))


def standard_error(influence: Tensor) -> float:
    """sd(ψ)/√n of per-group influence contributions (the SE of a mean over n groups)."""
    n = influence.numel()
    if n < 2:
        raise ValueError("a standard error needs at least 2 prompt groups")
    return float(influence.std(correction=1) / math.sqrt(n))


def group_sums(values: Tensor, G: int) -> Tensor:
    """Per-prompt-group sums ``[B*G] -> [B]`` of prompt-major per-response values (float64)."""
    return values.double().reshape(-1, G).sum(-1)
