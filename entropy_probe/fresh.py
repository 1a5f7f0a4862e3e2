"""The sampler's own entropy change, ΔH_sampler(η), by coupled fresh rollouts (DESIGN §2b).

What training will see after a step θ' = θ + ηv is H under θ''s *own* sampler q_θ' (its own
nucleus): H_sampler(θ') = E_x E_{y∼q_θ'}[S'(y)] / E[D'] with S' the per-prefix entropies under
θ'. With top_p < 1 it differs from the frozen-nucleus H of SNIS (:mod:`entropy_probe.snis`) at
first order (tokens cross the nucleus boundary), and SNIS cannot estimate it (the supports differ).

Every E slot (prompt slot b, response g) was drawn with explicit noise ξ_bg (Gumbel-max,
:mod:`entropy_probe.noise`). :func:`fresh_rollout_shard` redraws each slot of an E shard at θ'
with the same ξ, under θ''s own sampler, recording both per-prefix entropies at sampling time.
Most responses are the same for a small step, so the paired difference

    ΔĤ_sampler(η) = ΣS'/ΣD' − ΣS/ΣD      (D = T for `token`, 1 for `sequence`)

has a small variance (:func:`delta_h_sampler`); its SE comes from the paired prompt-group
contributions ψ_b = (S'_b − Ĥ'D'_b)/D̄' − (S_b − ĤD_b)/D̄ (:func:`normalization.ratio_influence`),
SE = sd(ψ)/√n. :func:`independent_noise_se` estimates, from the same data, the SE the same
estimator would have with independent noise: what the coupling saved.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import generate, noise, normalization as norm, parameters, rollout as rollouts
from .shards import ShardError

# per-response sums of the E rollout (at θ) a fresh shard carries, for the paired reduction
BASE_FIELDS = {"sampler": "base_S", "tempered_full": "base_S_tempered_full"}


def prompt_table(rollout: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The left-padded prompts ``[B, P]`` and their attention masks of a rollout shard."""
    B, G, L = rollout["sequences"].shape
    P = L - rollout["token_log_q"].shape[-1]
    return rollout["sequences"][:, 0, :P], rollout["attention_masks"][:, 0, :P]


def _crop_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the leading columns that are padding in every row (left padding to the call's longest)."""
    used = mask.bool().any(0).nonzero()
    start = int(used[0]) if used.numel() else 0
    return ids[:, start:], mask[:, start:]


def responses_changed(base_tokens: Tensor, base_lens: Tensor, new_tokens: Tensor, new_lens: Tensor) -> Tensor:
    """Whether each response differs from its base in length or in any token: ``[..., T], [...],
    [..., T'], [...] -> [...]`` bool."""
    width = max(base_tokens.shape[-1], new_tokens.shape[-1])
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[-1]))  # noqa: E731
    positions = torch.arange(width)
    valid = positions < torch.minimum(base_lens, new_lens)[..., None]
    return (base_lens != new_lens) | ((pad(base_tokens) != pad(new_tokens)) & valid).any(-1)


def fresh_rollout_shard(
    model, tokenizer, rollout: dict[str, Tensor], direction: dict[str, Tensor], eta: float, *, slots, seed: int,
    temperature: float, top_p: float, max_new_tokens: int, gen_batch_size: int,
    stop_strings: list[str] | tuple[str, ...] = (), stream: int = noise.STREAM_E, autocast_dtype=None,
    kv_cache: str = "dynamic",
) -> dict[str, Tensor]:
    """Redraw every response slot of an E rollout shard at θ' = θ + η·direction with the same noise.

    ``rollout``: the E shard (its prompts, responses and sampling-time entropies at θ); ``slots``
    ``[B]``: each prompt's slot in the whole E batch (:func:`entropy_probe.plan.shard_slots`), so
    response g of slot b gets the noise of key (``seed``, ``stream``, b, g, k, v) exactly as it did
    at θ. Sampling is :func:`generate.sample` under θ''s own sampler (nucleus from θ''s logits),
    with the parameters applied by :func:`parameters.call_at` (the model is never written);
    ``gen_batch_size`` sequences per call (execution only). ``autocast_dtype`` (``model.precision``)
    and ``kv_cache`` as in :func:`generate.sample`: the precision of the rollouts at θ.

    Returns (B prompts, G responses, T' the fresh width): ``response_tokens`` ``[B, G, T']``,
    ``response_lens`` and ``stop_reason`` ``[B, G]``, ``token_log_q``, ``rb_entropies`` and
    ``tempered_entropies`` ``[B, G, T']`` (sampling time, 0 past the end), ``changed`` ``[B, G]``
    (the response differs from the one drawn at θ), ``prompt_ids`` ``[B]``, and the base sums
    ``base_S``, ``base_S_tempered_full``, ``base_T`` ``[B, G]`` float64 from the rollout shard.
    """
    B, G, L = rollout["sequences"].shape
    T = rollout["token_log_q"].shape[-1]
    slots = [int(s) for s in slots]
    if len(slots) != B:
        raise ValueError(f"{len(slots)} slots for {B} prompt groups")
    prompt_ids, prompt_mask = prompt_table(rollout)
    point = parameters.shifted(model, direction, eta)
    key = noise.NoiseKey(seed, stream)
    rows_per_call = max(1, gen_batch_size // G)
    parts = []
    for lo in range(0, B, rows_per_call):
        ids, mask = _crop_left(prompt_ids[lo:lo + rows_per_call], prompt_mask[lo:lo + rows_per_call])
        parts.append(parameters.call_at(model, point, lambda: generate.sample(
            model, ids, mask, G, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, noise_key=key,
            slots=slots[lo:lo + rows_per_call], stop_strings=stop_strings, tokenizer=tokenizer,
            autocast_dtype=autocast_dtype, kv_cache=kv_cache,
        )))
    width = max(p.response_tokens.shape[1] for p in parts)

    def cat(field, value=0):
        return torch.cat([torch.nn.functional.pad(getattr(p, field), (0, width - getattr(p, field).shape[1]),
                                                  value=value) for p in parts]).view(B, G, width)

    out = {
        "response_tokens": cat("response_tokens", tokenizer.pad_token_id),
        "response_lens": torch.cat([p.response_lens for p in parts]).view(B, G),
        "stop_reason": torch.cat([p.stop_reason for p in parts]).view(B, G),
        "token_log_q": cat("token_log_q"),
        "rb_entropies": cat("entropies"),
        "tempered_entropies": cat("tempered_entropies"),
        "prompt_ids": rollout["prompt_ids"].clone(),
    }
    base_tokens = rollout["sequences"][:, :, L - T:]
    out["changed"] = responses_changed(base_tokens, rollout["response_lens"], out["response_tokens"],
                                       out["response_lens"])
    for entropy, field in BASE_FIELDS.items():
        out[field] = rollouts.sampled_entropies(rollout, entropy).double().sum(-1)
    out["base_T"] = rollout["response_lens"].double()
    return out


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
    H_new, psi_new = norm.ratio_influence(norm.group_sums(S_new, G), norm.group_sums(D_new, G))
    H_base, psi_base = norm.ratio_influence(norm.group_sums(S_base, G), norm.group_sums(D_base, G))
    psi = psi_new - psi_base
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


def per_response(tensors: dict[str, Tensor], entropy: str) -> dict[str, Tensor]:
    """The per-response values :func:`delta_h_sampler` takes, ``[B*G]`` each, from a fresh shard's
    tensors: S' (sampling-time entropies of kind ``entropy`` summed), T', S and T at θ, changed."""
    return {
        "S_new": rollouts.sampled_entropies(tensors, entropy).double().sum(-1).reshape(-1),
        "T_new": tensors["response_lens"].double().reshape(-1),
        "S_base": tensors[BASE_FIELDS[entropy]].double().reshape(-1),
        "T_base": tensors["base_T"].double().reshape(-1),
        "changed": tensors["changed"].reshape(-1),
    }


def reduce_shards(loaded: list[tuple[dict[str, Tensor], dict]], etas: list[float], G: int, normalization: str,
                  entropy: str, where=None) -> tuple[list[dict], str]:
    """Rows of :func:`delta_h_sampler` for each η of ``etas`` from fresh shards ((tensors, header)
    pairs, any order): every η needs the same complete set of E shards (whole batch, never per
    shard) and one model. Returns (rows, model fingerprint)."""
    where = where or "fresh-rollout shards"
    if len({m["model_fingerprint"] for _, m in loaded}) != 1:
        raise ShardError(f"{where}: come from different models")
    counts = {int(m["num_shards"]) for _, m in loaded}
    if len(counts) != 1:
        raise ShardError(f"{where}: come from E batches cut into different numbers of shards {sorted(counts)}")
    (count,) = counts
    by_eta: dict[float, dict[int, dict]] = {}
    for tensors, meta in loaded:
        by_eta.setdefault(float(meta["eta"]), {})[int(meta["shard_index"])] = tensors
    if set(by_eta) != {float(e) for e in etas}:
        raise ShardError(f"{where}: hold η {sorted(by_eta)}, expected {sorted(float(e) for e in etas)}")
    rows = []
    for eta in sorted(by_eta):
        shards_of_eta = by_eta[eta]
        if sorted(shards_of_eta) != list(range(count)):
            raise ShardError(f"{where}: η = {eta} has shards {sorted(shards_of_eta)} of {count}")
        parts = [per_response(shards_of_eta[k], entropy) for k in range(count)]
        whole = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
        rows.append({"eta": eta, **delta_h_sampler(**whole, G=G, normalization=normalization)})
    return rows, loaded[0][1]["model_fingerprint"]
