"""The sampling measure q (DESIGN §2): tempered softmax renormalized on the top-p nucleus.

Every entropy, every log-probability in X and every importance weight uses this one measure.
All functions are pure tensor functions over the last (vocabulary) dimension.
"""
from __future__ import annotations

import torch
from torch import Tensor


def nucleus_mask(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The nucleus S_k as a bool mask, ``[..., V] -> [..., V]``.

    p = softmax(z / τ) in fp32; tokens are taken in descending probability (stable sort, so ties
    break by token id) while the mass *before* a token is < top_p, so the token that crosses top_p
    is kept — the rule of transformers' top-p sampler. Never differentiable: S_k is held fixed.
    """
    with torch.no_grad():
        if top_p >= 1.0:
            return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True  # the most probable token is always in the nucleus
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def log_q(logits: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """log q_k(v) = log softmax(z/τ) renormalized on S_k (−inf outside), ``[..., V]``, fp32.

    Differentiable in the logits with the nucleus ``mask`` held fixed.
    """
    scaled = logits.float() / temperature
    return torch.log_softmax(scaled.masked_fill(~mask, float("-inf")), dim=-1)


def rb_entropy(log_probs: Tensor, mask: Tensor) -> Tensor:
    """Rao–Blackwellized entropy h_k = −Σ_{v∈S_k} q(v) log q(v), ``[..., V] -> [...]``.

    ``log_probs`` is :func:`log_q`; entries outside the nucleus contribute exactly 0 (and no NaN
    gradient, since their −inf is replaced before the product).
    """
    finite_log_q = log_probs.masked_fill(~mask, 0.0)
    return -(finite_log_q.exp() * finite_log_q).sum(dim=-1)


def score_tokens(logits: Tensor, tokens: Tensor, temperature: float, top_p: float):
    """Per-token log q_k(y_k), RB entropy h_k and nucleus membership of y_k.

    logits ``[..., V]``, tokens ``[...]`` (long) -> three tensors of shape ``[...]``:
    ``token_log_q`` (fp32, differentiable), ``entropy`` (fp32, differentiable with S_k fixed),
    ``in_nucleus`` (bool). A token outside its nucleus has log q = −inf: callers must check
    ``in_nucleus`` (a sampled token always lies in S_k).
    """
    mask = nucleus_mask(logits, temperature, top_p)
    lq = log_q(logits, mask, temperature)
    index = tokens.unsqueeze(-1)
    token_log_q = lq.gather(-1, index).squeeze(-1)
    in_nucleus = mask.gather(-1, index).squeeze(-1)
    return token_log_q, rb_entropy(lq, mask), in_nucleus


def tempered_token_log_prob(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log softmax(z/τ)(y_k), ``[..., V], [...] -> [...]``: the log-prob trainers use in the
    GRPO objective (no top-p truncation, DESIGN §2 "Y and v")."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
