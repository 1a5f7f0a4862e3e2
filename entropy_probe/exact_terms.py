"""Exact per-prompt terms of ∇H·u and the exact expected GRPO gradient, by enumeration of every
response (:mod:`entropy_probe.exact`): the ground truth of the attribution's per-prompt shares and
of the Y passes (tiny policies only; one backward pass per prompt and quantity).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import normalization as norm, parameters
from .exact import Enumeration, _grads, enumerate_responses


def exact_prompt_contributions(
    model, tokenizer, prompts: list[str], direction: dict[str, Tensor], *, temperature: float, top_p: float,
    max_new_tokens: int, normalization: str = "token",
) -> dict[str, Tensor | float]:
    """Each prompt's exact term of ∇H·u (u = ``direction``), prompts uniform, float64.

    With s_x = E_q[S|x], d_x = E_q[D|x] (D = T for ``token``, 1 for ``sequence``), their
    derivatives ∂s_x, ∂d_x along u, C = mean_x d_x, H = mean_x s_x / C, B = mean_x ∂d_x:

    - ``term`` c_x = (∂s_x − H ∂d_x)/C: ∇H·u = mean_x c_x (the quotient rule, H and C fixed);
    - ``influence_form`` φ_x = c_x − (B/C²)(s_x − H d_x) + (∇H·u)(1 − d_x/C): also how prompt x
      moves H and C (its influence function plus ∇H·u), mean_x φ_x = ∇H·u. An E prompt group of
      prompt x has expected influence contribution φ_x (:mod:`entropy_probe.attribution`).

    Also ``grad_H_dot_u``. By autograd through the enumeration, one backward pass per prompt and
    quantity (tiny policies only)."""
    params = parameters.select(model)
    names = list(params)
    rule = norm.get(normalization)
    with torch.enable_grad():
        enum = enumerate_responses(model, tokenizer, prompts, temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens)
        s = enum.per_prompt(enum.entropy_sum)
        d = enum.per_prompt(rule.denominators(enum.lengths))

        def along(value: Tensor) -> float:
            grads = torch.autograd.grad(value, [params[k] for k in names], retain_graph=True, allow_unused=True)
            return sum(float((g.double().cpu() * direction[k].double().cpu()).sum())
                       for k, g in zip(names, grads) if g is not None and k in direction)

        ds = torch.tensor([along(s[i]) for i in range(len(prompts))], dtype=torch.float64)
        dd = torch.tensor([along(d[i]) for i in range(len(prompts))], dtype=torch.float64)
    s, d = s.detach().cpu(), d.detach().cpu()
    C = d.mean()
    H = s.mean() / C
    B = dd.mean()
    term = (ds - H * dd) / C
    total = term.mean()
    influence_form = term - B / C**2 * (s - H * d) + total * (1 - d / C)
    return {"term": term, "influence_form": influence_form, "grad_H_dot_u": float(total), "H": float(H)}


def exact_match_rewards(enum: Enumeration, tokenizer, golds: list[str]) -> Tensor:
    """Exact-match reward of every leaf, ``[M]`` float64: decoded response (first T tokens,
    special tokens skipped, stripped) == stripped gold of its prompt."""
    if len(golds) != enum.n_prompts:
        raise ValueError(f"{len(golds)} gold answers for {enum.n_prompts} prompts")
    texts = enum.texts(tokenizer)
    return torch.tensor(
        [float(t.strip() == str(golds[i]).strip()) for t, i in zip(texts, enum.prompt_index.tolist())],
        dtype=torch.float64, device=enum.log_q.device,
    )


def exact_grpo_gradient(
    model, tokenizer, prompts: list[str], golds: list[str], *, temperature: float, top_p: float,
    max_new_tokens: int, G: int,
) -> dict[str, Tensor]:
    """Exact E[Y] of the GRPO ``seq_mean_token_mean`` objective gradient (ascent direction).

    One group of G iid responses per prompt drawn from q, prompts uniform, A_i = r_i − mean_g r_g
    (no std scaling), Y = mean_x (1/G) Σ_i A_i f_i with f = (1/T) Σ_k ∇ log softmax(z_k/τ)(y_k).
    Closed form per prompt: E[Y|x] = (G−1)/G · (E_q[r f] − E_q[r] E_q[f]); computed as the
    gradient of (G−1)/G · mean_x Σ_y q(y)(r(y) − E_q[r]) (1/T) Σ_k log p_τ(y_k) with q held fixed.
    name -> float64 tensor for every trainable parameter; leaves no ``.grad``.
    """
    if G < 1:
        raise ValueError("G must be >= 1")
    params = parameters.select(model)
    with torch.enable_grad():
        enum = enumerate_responses(
            model, tokenizer, prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
        )
        rewards = exact_match_rewards(enum, tokenizer, golds)
        q = enum.q.detach()
        expected_r = q.new_zeros(enum.n_prompts).index_add(0, enum.prompt_index, q * rewards)
        token_mean_log_p = enum.log_p_tempered.sum(-1) / enum.lengths.to(torch.float64)
        centred = rewards - expected_r[enum.prompt_index]
        objective = (G - 1) / G * (q * centred * token_mean_log_p).sum() / enum.n_prompts
        return _grads(objective, params)
