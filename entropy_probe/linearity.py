"""The linearity check δH₁(η)/ΔH(η) with its error bar (DESIGN §2: the exact ratio → 1 as η → 0).

δH₁ = η·X·v and the SNIS ΔH(η) (θ's nucleus) come from the same E batch, so their errors are
correlated; both are (to first order) means of per-prompt-group contributions ψ^a_b and ψ^b_b
(:func:`normalization.directional_influence`, :func:`snis.ratio_terms`). The delta method on the
ratio r = a/b works group by group: ψ^r_b = ψ^a_b / b − a ψ^b_b / b², SE(r) = sd(ψ^r)/√n — the
covariance of the two is included. v is the same in both, so the U-batch noise in v does not enter.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import estimators, normalization as norm, snis


def ratio_with_se(a: float, psi_a: Tensor, b: float, psi_b: Tensor) -> tuple[float | None, float | None]:
    """(a/b, its delta-method SE) from the two estimates and their per-group contributions
    ``[n]`` (same groups); (None, None) when b = 0."""
    if b == 0:
        return None, None
    psi_r = psi_a.double() / b - a * psi_b.double() / b**2
    return a / b, norm.standard_error(psi_r)


def linearity(directional: list[dict[str, Tensor]], snis_shards: list[dict[str, Tensor]], etas: list[float], G: int,
              normalization: str, entropy: str) -> dict[float, dict]:
    """{η: {"ratio", "ratio_se"}} for every η of ``etas`` the SNIS shards hold, from the
    directional shards' per-group sums (P, Q, S, T) and the SNIS shards' per-sequence values, both
    in E-shard order (prompt groups aligned). δH₁ here is η·X·v of the directional pass (equal to
    the reverse-mode X·v to ~1e-7, checked by the delta_h1 stage)."""
    P, Q, S, T = (torch.cat([d[k] for d in directional]) for k in ("P", "Q", "S", "T"))
    xv, psi_x = estimators.directional_contributions(P, Q, S, T, G, normalization)
    S_field, S_shifted_field = snis.ENTROPY_FIELDS[entropy]
    shard_etas = [float(e) for e in snis_shards[0]["etas"].tolist()]
    cat = {k: torch.cat([s[k] for s in snis_shards], dim=-1) for k in ("log_w", S_shifted_field, S_field, "T")}
    if cat["T"].numel() != P.numel() * G:
        raise ValueError(f"{P.numel()} prompt groups in the directional shards, {cat['T'].numel()} sequences in "
                         "the SNIS shards")
    out = {}
    for eta in etas:
        if eta not in shard_etas:
            continue
        j = shard_etas.index(eta)
        H_shifted, H_base, psi_b = snis.ratio_terms(cat["log_w"][j], cat[S_shifted_field][j], cat[S_field], cat["T"],
                                                    G, normalization)
        ratio, se = ratio_with_se(eta * xv, eta * psi_x, H_shifted - H_base, psi_b)
        out[eta] = {"ratio": ratio, "ratio_se": se}
    return out
