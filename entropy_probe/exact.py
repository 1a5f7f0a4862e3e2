"""Exact-enumeration ground truth for tiny policies (DESIGN §2, "Ground truth").

Every response y with q(y|x) > 0 of every prompt x is enumerated by expanding, depth by depth,
every live prefix into every token of its nucleus S_k. One batched forward pass per depth scores
all live prefixes of all prompts at once (full sequences prompt + prefix, right-padded, with an
attention mask; right padding leaves the positions of the real tokens at 0..L-1). A response
ends at its first EOS (scored, counted in T) or after ``max_new_tokens`` tokens; a sampled pad
token is an ordinary token.

Quantities (DESIGN §2), all accumulated in float64 from the model's fp32 logits:

- p_k = softmax(z_k/τ); S_k = :func:`entropy_probe.measure.nucleus_mask` (fp32, the contract's
  one function); q_k = p_k renormalized on S_k (log-softmax of the masked z_k/τ, float64);
- h_k = −Σ_{v∈S_k} q_k(v) log q_k(v) (``entropy="sampler"``), or the full-vocabulary tempered
  entropy −Σ_{v∈V} p_k(v) log p_k(v) (``"tempered_full"``, DESIGN §2b "Which entropy"; the same
  arithmetic with the whole vocabulary as the nucleus, so with top_p = 1 the two are identical);
  S(y) = Σ_k h_k; log q(y|x) = Σ_k log q_k(y_k);
- H = mean_x E_q[S] / mean_x E_q[T] (``token``) or mean_x E_q[S] (``sequence``);
- ∇H by autograd through the enumeration (q's dependence gives the score term, h's the pathwise
  term; the nucleus is held fixed, it is locally constant).

The log-probabilities and entropies are recomputed here in float64 rather than with
``measure.log_q`` / ``measure.rb_entropy`` (fp32), so the ground truth is independent of the
package's own arithmetic except for the nucleus rule, which is the contract itself.

Sizes: with V tokens and N = max_new_tokens, a prompt has at most V^N leaves (the toy: 14 tokens,
N = 3: at most 1 + 13 + 13·13·14 = 2380 leaves when EOS ends a branch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from . import entropies, first_order, gradients, measure, normalization as norm, parameters


@dataclass
class Enumeration:
    """Every response with q > 0, for every prompt; ``M`` leaves in all (grouped by prompt)."""

    prompt_index: Tensor  # [M] long, which prompt (0 .. n_prompts-1)
    tokens: Tensor  # [M, max_new_tokens] long, response tokens, pad id past the end
    lengths: Tensor  # [M] long, response length T (EOS included when emitted)
    log_q: Tensor  # [M] float64, log q(y|x) = Σ_k log q_k(y_k)  (differentiable when grad is on)
    entropy_sum: Tensor  # [M] float64, S(y) = Σ_k h_k                (differentiable when grad is on)
    log_p_tempered: Tensor  # [M, max_new_tokens] float64, log softmax(z_k/τ)(y_k) (no top-p), 0 past the end
    n_prompts: int  # number of prompts (the mean over prompts is uniform over this list)

    @property
    def q(self) -> Tensor:
        """q(y|x), ``[M]`` float64 (differentiable when ``log_q`` is)."""
        return self.log_q.exp()

    def per_prompt(self, values: Tensor) -> Tensor:
        """E_q[values | x] for each prompt: ``[M] -> [n_prompts]`` (float64), Σ_y q(y|x) values(y)."""
        weighted = self.q * values.to(torch.float64)
        out = torch.zeros(self.n_prompts, dtype=torch.float64, device=weighted.device)
        return out.index_add(0, self.prompt_index, weighted)

    def texts(self, tokenizer) -> list[str]:
        """Decoded responses (first T tokens, special tokens skipped), one per leaf."""
        return [
            tokenizer.decode(row[:n].tolist(), skip_special_tokens=True)
            for row, n in zip(self.tokens, self.lengths.tolist())
        ]


def _prompt_table(tokenizer, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    """Prompt ids right-padded ``[n, P]`` and their lengths ``[n]`` (tokenized as the rollout does:
    the tokenizer's default special tokens)."""
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    if any(len(e) == 0 for e in encoded):
        raise ValueError("an empty prompt cannot be scored")
    width = max(map(len, encoded))
    table = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, e in enumerate(encoded):
        table[i, : len(e)] = torch.tensor(e, dtype=torch.long)
    return table.to(device), torch.tensor([len(e) for e in encoded], dtype=torch.long, device=device)


def _next_token_logits(model, params, ids: Tensor, attention: Tensor, last: Tensor) -> Tensor:
    """Logits at position ``last`` of each right-padded row, ``[A, V]``."""
    kwargs = dict(input_ids=ids, attention_mask=attention, use_cache=False)
    out = model(**kwargs) if params is None else functional_call(model, params, args=(), kwargs=kwargs)
    return out.logits[torch.arange(ids.shape[0], device=ids.device), last]


def enumerate_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    params: dict[str, Tensor] | None = None,
    nucleus: str = "own",
    entropy: str = "sampler",
) -> Enumeration:
    """Every response with q(y|x) > 0 for every prompt, with its exact log q, S and tempered log-probs.

    ``params``: optional name -> tensor dict evaluated with ``torch.func.functional_call`` (e.g.
    θ' = θ + ηv) without touching the model; names not in it keep the model's values.
    ``nucleus``: ``"own"`` (default) computes S_k from the logits of the parameters being evaluated;
    ``"base"`` computes S_k from the model's own parameters (θ) while q_k is computed from
    ``params`` (θ') — the measure q_θ' the SNIS target of DESIGN §2 uses with top_p < 1.
    ``entropy``: which per-prefix entropy S(y) sums (:data:`entropies.ENTROPY_KINDS`).
    Gradients flow to the model parameters (or to ``params``) when torch grad mode is on.
    One batched forward pass per depth over all live prefixes of all prompts.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if nucleus not in ("own", "base"):
        raise ValueError(f"nucleus must be 'own' or 'base', not {nucleus!r}")
    full_entropy = entropies.get(entropy).full_vocabulary
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    table, plen = _prompt_table(tokenizer, prompts, device)
    n = len(prompts)

    # Live prefixes: prompt index, tokens so far, running log q, running S, per-token log p_τ.
    live_prompt = torch.arange(n, device=device)
    live_tokens = torch.zeros((n, 0), dtype=torch.long, device=device)
    live_log_q = torch.zeros(n, dtype=torch.float64, device=device)
    live_entropy = torch.zeros(n, dtype=torch.float64, device=device)
    live_log_p = torch.zeros((n, 0), dtype=torch.float64, device=device)
    leaves: list[tuple[Tensor, ...]] = []

    for depth in range(max_new_tokens):
        rows = live_prompt.shape[0]
        if rows == 0:
            break
        lengths = plen[live_prompt] + depth
        width = int(lengths.max())
        ids = torch.full((rows, width), pad, dtype=torch.long, device=device)
        ids[:, : table.shape[1]] = table[live_prompt][:, :width]
        if depth:
            ids.scatter_(1, plen[live_prompt][:, None] + torch.arange(depth, device=device), live_tokens)
        attention = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
        logits = _next_token_logits(model, params, ids, attention, lengths - 1)
        if nucleus == "base" and params is not None:
            with torch.no_grad():
                mask = measure.nucleus_mask(
                    _next_token_logits(model, None, ids, attention, lengths - 1), temperature, top_p
                )
        else:
            mask = measure.nucleus_mask(logits, temperature, top_p)

        scaled = logits.to(torch.float64) / temperature
        log_q_k = torch.log_softmax(scaled.masked_fill(~mask, float("-inf")), dim=-1)
        finite = log_q_k.masked_fill(~mask, 0.0)
        log_p_k = torch.log_softmax(scaled, dim=-1)
        h_from = log_p_k if full_entropy else finite
        h_k = -(h_from.exp() * h_from).sum(-1)  # [rows]

        row, token = mask.nonzero(as_tuple=True)  # every child (prefix, v ∈ S_k)
        child_prompt = live_prompt[row]
        child_tokens = torch.cat([live_tokens[row], token[:, None]], 1)
        child_log_q = live_log_q[row] + finite[row, token]
        child_entropy = live_entropy[row] + h_k[row]
        child_log_p = torch.cat([live_log_p[row], log_p_k[row, token][:, None]], 1)

        done = token == eos if depth + 1 < max_new_tokens else torch.ones_like(token, dtype=torch.bool)
        if done.any():
            leaves.append((child_prompt[done], child_tokens[done], child_log_q[done],
                           child_entropy[done], child_log_p[done], depth + 1))
        go = ~done
        live_prompt, live_tokens = child_prompt[go], child_tokens[go]
        live_log_q, live_entropy, live_log_p = child_log_q[go], child_entropy[go], child_log_p[go]

    prompt_index, tokens, lengths, log_q, entropy_sum, log_p = [], [], [], [], [], []
    for p_idx, toks, lq, ent, lp, length in leaves:
        m = p_idx.shape[0]
        fill = max_new_tokens - length
        prompt_index.append(p_idx)
        tokens.append(torch.cat([toks, torch.full((m, fill), pad, dtype=torch.long, device=device)], 1))
        lengths.append(torch.full((m,), length, dtype=torch.long, device=device))
        log_q.append(lq)
        entropy_sum.append(ent)
        log_p.append(torch.cat([lp, lp.new_zeros((m, fill))], 1))
    prompt_index = torch.cat(prompt_index)
    order = torch.argsort(prompt_index, stable=True)  # group the leaves by prompt
    return Enumeration(
        prompt_index=prompt_index[order],
        tokens=torch.cat(tokens)[order],
        lengths=torch.cat(lengths)[order],
        log_q=torch.cat(log_q)[order],
        entropy_sum=torch.cat(entropy_sum)[order],
        log_p_tempered=torch.cat(log_p)[order],
        n_prompts=n,
    )


def exact_entropy(enum: Enumeration, normalization: str = "token") -> Tensor:
    """Exact H = mean_x E_q[S] / mean_x E_q[D], a float64 scalar (differentiable when the
    enumeration is), prompts uniform; D = T (``token``) or 1 (``sequence``, E_q[1] = 1)."""
    expected_d = enum.per_prompt(norm.get(normalization).denominators(enum.lengths)).mean()
    return enum.per_prompt(enum.entropy_sum).mean() / expected_d


def _grads(output: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """d output / d params with ``torch.autograd.grad`` (never sets ``.grad``); unused -> zeros."""
    names = list(params)
    grads = torch.autograd.grad(output, [params[k] for k in names], allow_unused=True)
    return {
        k: (torch.zeros_like(params[k]) if g is None else g).detach().to(torch.float64)
        for k, g in zip(names, grads)
    }


def exact_entropy_and_grad(
    model, tokenizer, prompts: list[str], *, temperature: float, top_p: float, max_new_tokens: int,
    normalization: str = "token", entropy: str = "sampler",
) -> tuple[float, dict[str, Tensor]]:
    """(H(θ), ∇H(θ)) exactly; ∇H keyed by trainable parameter name, float64 (fp32 model arithmetic),
    by autograd through the enumeration with the nucleus held fixed. Leaves no ``.grad``."""
    params = parameters.select(model)
    with torch.enable_grad():
        enum = enumerate_responses(
            model, tokenizer, prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            entropy=entropy,
        )
        entropy = exact_entropy(enum, normalization)
        return entropy.item(), _grads(entropy, params)


def exact_entropy_grad(
    model, tokenizer, prompts: list[str], *, temperature: float, top_p: float, max_new_tokens: int,
    normalization: str = "token", entropy: str = "sampler",
) -> dict[str, Tensor]:
    """Exact ∇H(θ) (DESIGN §2): name -> float64 tensor for every trainable parameter."""
    return exact_entropy_and_grad(
        model, tokenizer, prompts, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, normalization=normalization, entropy=entropy,
    )[1]


def exact_entropy_at(
    model, tokenizer, prompts: list[str], *, temperature: float, top_p: float, max_new_tokens: int,
    normalization: str = "token", direction: dict[str, Tensor], eta: float, nucleus: str = "own",
    entropy: str = "sampler",
) -> float:
    """Exact H(θ + η·direction) via ``functional_call`` (the model is not modified).

    ``nucleus="own"`` (default): S_k from θ' 's own logits (the sampler's measure at θ');
    ``"base"``: S_k from θ, q from θ' (the SNIS target with top_p < 1, DESIGN §2 "ΔH(η)").
    """
    params = parameters.shifted(model, direction, eta)
    with torch.no_grad():
        enum = enumerate_responses(
            model, tokenizer, prompts, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, params=params, nucleus=nucleus, entropy=entropy,
        )
        return exact_entropy(enum, normalization).item()


def exact_reference(model, tokenizer, prompts: list[str], direction: dict[str, Tensor], etas: list[float], *,
                    temperature: float, top_p: float, max_new_tokens: int, normalization: str = "token",
                    entropy: str = "sampler") -> dict:
    """The exact values a run's estimates are held against (the reference stage): H, ∇H·v and,
    for every η ≠ 0 of ``etas``, ``exact_delta_h`` (θ's nucleus kept at every position: what SNIS
    estimates and δH₁ is checked against), ``exact_delta_h_sampler`` (θ + ηv's own nucleus: what
    the fresh rollouts estimate; the same number with top_p = 1) and ``exact_delta_h1`` = η·∇H·v."""
    kwargs = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, normalization=normalization,
                  entropy=entropy)
    H, grad = exact_entropy_and_grad(model, tokenizer, prompts, **kwargs)
    grad_dot_v = gradients.dot(gradients.restrict(grad, direction), direction)
    etas = sorted(set(etas) - {0.0})

    def at(eta: float, nucleus: str) -> float:
        return exact_entropy_at(model, tokenizer, prompts, direction=direction, eta=eta, nucleus=nucleus, **kwargs)

    base = at(0.0, "base")
    rows = []
    for eta in etas:
        frozen = at(eta, "base")
        own = at(eta, "own") if top_p < 1.0 else frozen  # top_p = 1: one nucleus
        rows.append({"eta": eta, "exact_delta_h": frozen - base, "exact_delta_h_sampler": own - base,
                     "exact_delta_h1": first_order.delta_h1(eta, grad_dot_v)["delta_h1"]})
    return {"H": H, "grad_H_dot_v": grad_dot_v, "num_prompts": len(prompts), "entropy": entropy, "delta_h": rows}
