"""The linearity check δH₁(η)/ΔH(η) with its error bar: the exact ratio → 1 as η → 0 (DESIGN §2).

δH₁ = η·X·v and the SNIS ΔH(η) (θ's nucleus) come from the same E batch, so their errors are
correlated; both are (to first order) means of per-prompt-group contributions ψ^a_b and ψ^b_b
(:func:`estimators.xu_influence`, :func:`snis.ratio_terms`). The delta method on the
ratio r = a/b works group by group: ψ^r_b = ψ^a_b / b − a ψ^b_b / b², SE(r) = sd(ψ^r)/√n — the
covariance of the two is included. v is the same in both, so the U-batch noise in v does not enter.
"""
from __future__ import annotations

from torch import Tensor

from . import estimators, normalization as norm, snis


def ratio_with_se(a: float, psi_a: Tensor, b: float, psi_b: Tensor) -> tuple[float | None, float | None]:
    """(a/b, its delta-method SE) from the two estimates and their per-group contributions
    ``[n]`` (same groups); (None, None) when b = 0."""
    if b == 0:
        return None, None
    psi_r = psi_a.double() / b - a * psi_b.double() / b**2
    return a / b, norm.standard_error(psi_r)


def linearity(sums: dict[str, Tensor], snis_etas: list[float], log_w: Tensor, S_shifted: Tensor, S: Tensor,
              T: Tensor, etas: list[float], G: int, normalization: str) -> dict[float, dict]:
    """{η: {"ratio", "ratio_se"}} for every η of ``etas`` the SNIS sweep ``snis_etas`` holds, from
    a directional pass's per-group sums (``sums``: P, Q, S, T ``[n]``) and the SNIS values of the
    same E batch (``log_w``, ``S_shifted`` ``[len(snis_etas), N]``, ``S``, ``T`` ``[N]``; prompt
    groups aligned). δH₁ here is η·X·v of the directional pass (equal to the reverse-mode X·v to
    ~1e-7, checked by the delta_h1 stage)."""
    xv, psi_x = estimators.directional_contributions(sums["P"], sums["Q"], sums["S"], sums["T"], G, normalization)
    if T.numel() != sums["P"].numel() * G:
        raise ValueError(f"{sums['P'].numel()} prompt groups in the directional shards, {T.numel()} sequences in "
                         "the SNIS shards")
    out = {}
    for eta in etas:
        if eta not in snis_etas:
            continue
        j = snis_etas.index(eta)
        H_shifted, H_base, psi_b = snis.ratio_terms(log_w[j], S_shifted[j], S, T, G, normalization)
        ratio, se = ratio_with_se(eta * xv, eta * psi_x, H_shifted - H_base, psi_b)
        out[eta] = {"ratio": ratio, "ratio_se": se}
    return out
