"""The sampler's own entropy change, ΔH_sampler(η), by coupled fresh rollouts (DESIGN §2b).

What training will see after a step θ' = θ + ηv is H under θ''s *own* sampler q_θ' (its own
nucleus): H_sampler(θ') = E_x E_{y∼q_θ'}[S'(y)] / E[D'] with S' the per-prefix entropies under
θ'. With top_p < 1 it differs from the frozen-nucleus H of SNIS (:mod:`entropy_probe.snis`) at
first order (tokens cross the nucleus boundary), and SNIS cannot estimate it (the supports differ).

Every E slot (prompt slot b, response g) was drawn with explicit noise ξ_bg (Gumbel-max,
:mod:`entropy_probe.noise`). The fresh-rollout pass (:mod:`entropy_probe.fresh_pass`) redraws
each slot of an E shard at θ' with the same ξ, under θ''s own sampler, recording both per-prefix
entropies at sampling time. Most responses are the same for a small step, so the paired difference

    ΔĤ_sampler(η) = ΣS'/ΣD' − ΣS/ΣD      (D = T for `token`, 1 for `sequence`)

has a small variance (:func:`delta_h_sampler`); its SE comes from the paired prompt-group
contributions ψ_b = (S'_b − Ĥ'D'_b)/D̄' − (S_b − ĤD_b)/D̄ (:func:`normalization.ratio_influence`),
SE = sd(ψ)/√n. :func:`independent_noise_se` estimates, from the same data, the SE the same
estimator would have with independent noise: what the coupling saved.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import entropies, normalization as norm


# With top_p < 1, rows whose E batch holds fewer than this many sequences along which θ + ηv's own
# nucleus differs from θ's (the events that carry the boundary part of the sampler's change) are
# flagged: there the SE, estimated from the same few events, under-covers the exact change
# (benchmarks/sampler_flag_calibration.py; benchmarks/README.md, "Sampler column calibration").
MIN_NUCLEUS_EVENTS = 20


def events_low(nucleus_events: int, top_p: float) -> bool:
    """Whether a sampler row rests on too few nucleus events to trust its SE (never at top_p = 1:
    one nucleus, no boundary part)."""
    return top_p < 1.0 and nucleus_events < MIN_NUCLEUS_EVENTS


def responses_changed(base_tokens: Tensor, base_lens: Tensor, new_tokens: Tensor, new_lens: Tensor) -> Tensor:
    """Whether each response differs from its base in length or in any token: ``[..., T], [...],
    [..., T'], [...] -> [...]`` bool."""
    width = max(base_tokens.shape[-1], new_tokens.shape[-1])
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[-1]))  # noqa: E731
    positions = torch.arange(width)
    valid = positions < torch.minimum(base_lens, new_lens)[..., None]
    return (base_lens != new_lens) | ((pad(base_tokens) != pad(new_tokens)) & valid).any(-1)


def independent_noise_se(phi_new: Tensor, phi_base: Tensor, psi: Tensor) -> float | None:
    """The SE the paired estimator would have had with noise independent of θ's draws, from the
    coupled data alone (None when G < 2).

    ``phi_new``, ``phi_base`` ``[n, G]``: per-response linearized contributions (φ_bg = (S_bg −
    Ĥ D_bg)/D̄, so that ψ_b = Σ_g φ'_bg − Σ_g φ_bg); ``psi`` ``[n]`` the coupled ψ_b. Responses of
    a group are iid given its prompt, so with d_bg = φ'_bg − φ_bg

        Var(ψ | coupled)  = Var_x(E[ψ|x]) + G·E[var_g(d)]
        Var(ψ | independent noise, same prompts) = Var_x(E[ψ|x]) + G·E[var_g(φ') + var_g(φ)]

    (the prompt-level term is the same: the prompts are kept; var_g is the within-group sample
    variance). The first line gives Var_x(E[ψ|x]) (clamped at 0), the second the answer.
    """
    n, G = phi_new.shape
    if G < 2:
        return None
    within_coupled = (phi_new - phi_base).var(dim=1, correction=1).mean()
    within_independent = phi_new.var(dim=1, correction=1).mean() + phi_base.var(dim=1, correction=1).mean()
    between = torch.clamp(psi.var(correction=1) - G * within_coupled, min=0.0)
    return float(torch.sqrt((between + G * within_independent) / n))


def delta_h_sampler(S_new: Tensor, T_new: Tensor, S_base: Tensor, T_base: Tensor, changed: Tensor, G: int,
                    normalization: str) -> dict:
    """ΔH_sampler at one η from whole-batch per-response values ``[N]`` (prompt-major, N = n·G),
    float64: H(θ') = ΣS'/ΣD', H̄(θ) = ΣS/ΣD over the same slots, the SE from the paired
    prompt-group contributions, how many responses changed, and what the coupling saved
    (:func:`independent_noise_se`; ``coupling_se_factor`` = that SE over ours, its square the
    variance reduction)."""
    S_new, S_base = S_new.double(), S_base.double()
    rule = norm.get(normalization)
    D_new, D_base = rule.denominators(T_new), rule.denominators(T_base)
    H_new, H_base, psi = sampler_terms(S_new, T_new, S_base, T_base, G, normalization)
    se = norm.standard_error(psi)
    n = psi.numel()
    phi_new = ((S_new - H_new * D_new) / (D_new.sum() / n)).view(n, G)
    phi_base = ((S_base - H_base * D_base) / (D_base.sum() / n)).view(n, G)
    se_independent = independent_noise_se(phi_new, phi_base, psi)
    changed = changed.reshape(-1)
    return {
        "delta_h": H_new - H_base,
        "se": se,
        "H_shifted": H_new,
        "H_base": H_base,
        "num_sequences": int(S_new.numel()),
        "changed_responses": int(changed.sum()),
        "changed_share": float(changed.double().mean()),
        "changed_groups": int(changed.view(n, G).any(-1).sum()),
        "se_independent_noise": se_independent,
        "coupling_se_factor": se_independent / se if se_independent is not None and se > 0 else None,
    }


def sampler_terms(S_new: Tensor, T_new: Tensor, S_base: Tensor, T_base: Tensor, G: int,
                  normalization: str) -> tuple[float, float, Tensor]:
    """(H(θ'), H̄(θ), ψ): the two plug-ins of :func:`delta_h_sampler` and the per-prompt-group
    linearized contributions ψ_b of their difference (``[n]``; the SE is sd(ψ)/√n)."""
    H_new, psi_new = norm.plugin_with_influence(S_new.double(), T_new, G, normalization)
    H_base, psi_base = norm.plugin_with_influence(S_base.double(), T_base, G, normalization)
    return H_new, H_base, psi_new - psi_base


def decompose(sampler: tuple[float, Tensor], frozen: tuple[float, Tensor]) -> dict:
    """ΔH_sampler = ΔH_frozen + the boundary part, on the same E slots: ``sampler`` and ``frozen``
    are (ΔH, ψ ``[n]``) of the sampler's change and of the change with θ's nucleus held fixed (SNIS),
    their ψ over the same prompt groups in the same order. The boundary part (what θ + ηv's own
    nucleus adds: tokens crossing the top_p boundary) is their difference, exactly; its SE comes
    from the paired contributions ψ_sampler − ψ_frozen."""
    (delta_sampler, psi_sampler), (delta_frozen, psi_frozen) = sampler, frozen
    if psi_sampler.shape != psi_frozen.shape:
        raise ValueError(f"the decomposition pairs prompt groups: {tuple(psi_sampler.shape)} against "
                         f"{tuple(psi_frozen.shape)}")
    return {"frozen": delta_frozen, "frozen_se": norm.standard_error(psi_frozen),
            "boundary": delta_sampler - delta_frozen, "boundary_se": norm.standard_error(psi_sampler - psi_frozen)}


def per_response(tensors: dict[str, Tensor], entropy: str) -> dict[str, Tensor]:
    """The per-response values :func:`delta_h_sampler` takes, ``[B*G]`` each, from a fresh shard's
    tensors: S' (sampling-time entropies of kind ``entropy`` summed), T', S and T at θ, changed."""
    kind = entropies.get(entropy)
    return {
        "S_new": tensors[kind.rollout_field].double().sum(-1).reshape(-1),
        "T_new": tensors["response_lens"].double().reshape(-1),
        "S_base": tensors[kind.fresh_base_field].double().reshape(-1),
        "T_base": tensors["base_T"].double().reshape(-1),
        "changed": tensors["changed"].reshape(-1),
    }
