"""ΔH(η) = H(θ + ηv) − H(θ) by self-normalized importance sampling on the E batch (DESIGN §2):
the pure statistics over the per-sequence values the SNIS pass records (:mod:`entropy_probe.snis_pass`:
log-weights and entropies at every θ' = θ + ηv, θ's nucleus kept), in float64.

Where SNIS fails: with a low effective sample size its delta-method SE is not to be trusted
(:data:`MIN_ESS_FRACTION`, calibrated by ``benchmarks/snis_ess_calibration.py``); the report flags
such rows and points to the sampler's own change, measured by coupled fresh rollouts
(:mod:`entropy_probe.fresh`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import normalization as norm

# Rows with ESS/N below this are flagged: their ±2 SE interval under-covers the exact ΔH (docs,
# "SNIS where it fails"; measured by benchmarks/snis_ess_calibration.py).
MIN_ESS_FRACTION = 0.1


def delta_h(log_w: Tensor, S_shifted: Tensor, S: Tensor, T: Tensor, own_differs: Tensor, G: int,
            normalization: str) -> dict:
    """ΔH at one η from whole-batch per-sequence values ``[N]`` (prompt-major), float64.

    w_i = exp(lw_i − max lw); H(θ') = Σ w S' / Σ w D and H̄(θ) = Σ S / Σ D on the same batch
    (paired), D the normalization's per-response denominator; SE by the delta method over
    prompt groups (:func:`normalization.ratio_influence` of both ratios). ``ess_low``: ESS/N
    below :data:`MIN_ESS_FRACTION` (the SE is not to be trusted there).
    """
    log_w, S = log_w.double(), S.double()
    w = torch.exp(log_w - log_w.max())
    ess = float(w.sum() ** 2 / (w**2).sum())
    H_shifted, H_base, influence = ratio_terms(log_w, S_shifted, S, T, G, normalization)
    return {
        "delta_h": H_shifted - H_base,
        "se": norm.standard_error(influence),
        "H_shifted": H_shifted,
        "H_base": H_base,
        "H_base_se": norm.standard_error(norm.plugin_with_influence(S, T, G, normalization)[1]),
        "ess": ess,
        "ess_fraction": ess / S.numel(),
        "ess_low": ess < MIN_ESS_FRACTION * S.numel(),
        "num_sequences": int(S.numel()),
        "log_weight_min": float(log_w.min()),
        "log_weight_max": float(log_w.max()),
        "own_nucleus_differs_share": float((w * own_differs.double()).sum() / w.sum()),
    }


def ratio_terms(log_w: Tensor, S_shifted: Tensor, S: Tensor, T: Tensor, G: int,
                normalization: str) -> tuple[float, float, Tensor]:
    """(H(θ'), H̄(θ), ψ): the two ratios of :func:`delta_h` and the per-prompt-group linearized
    contributions ψ_b of ΔH = H(θ') − H̄(θ) (``[n]``; the SE is sd(ψ)/√n)."""
    log_w = log_w.double()
    w = torch.exp(log_w - log_w.max())
    H_shifted, psi_shifted = norm.plugin_with_influence(S_shifted, T, G, normalization, weights=w)
    H_base, psi_base = norm.plugin_with_influence(S, T, G, normalization)
    return H_shifted, H_base, psi_shifted - psi_base


def delta_h_sweep(etas: list[float], log_w: Tensor, S_shifted: Tensor, S: Tensor, T: Tensor, own_differs: Tensor,
                  G: int, normalization: str) -> list[dict]:
    """One :func:`delta_h` row per η of the whole E batch's per-sequence values: ``log_w``,
    ``S_shifted``, ``own_differs`` ``[len(etas), N]`` and ``S``, ``T`` ``[N]``, prompt-major."""
    return [{"eta": eta, **delta_h(log_w[j], S_shifted[j], S, T, own_differs[j], G, normalization)}
            for j, eta in enumerate(etas)]
