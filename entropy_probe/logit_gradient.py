"""The per-token scores of the measure q (:mod:`entropy_probe.measure`) with their gradient with
respect to the logits in closed form, without autograd: the maths of the gradient passes' fused
output embedding (:mod:`entropy_probe.fused_head`), which applies it a chunk of tokens at a time
in two reused ``[chunk, V]`` fp32 buffers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import entropies
from .measure import nucleus_from_probs


def scores_with_logit_gradient(
    logits: Tensor, tokens: Tensor, temperature: float, top_p: float, *, want_q: bool = True,
    want_tempered: bool = False, coef_entropy: Tensor | None = None, coef_log_q: Tensor | None = None,
    coef_tempered: Tensor | None = None, overwrite: bool = False, workspace: Tensor | None = None,
    keep_tokens: bool = False, entropy: str = "sampler",
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-row scores of :func:`measure.score_tokens` / :func:`measure.tempered_token_log_prob` and, when any
    coefficient is given, the gradient of  F = Σ_r [c_h h_r + c_q log q_r(y_r) + c_p log p_r(y_r)]
    with respect to the logits, in closed form (the nucleus S held fixed), without autograd.

    logits ``[R, V]`` (any float dtype, scored in fp32), tokens ``[R]`` (long), coefficients
    ``[R]`` -> ({"token_log_q", "entropy", "in_nucleus", "tempered_log_p"} (those asked for),
    ``[R]`` each; grad ``[R, V]`` fp32 or None). With s = z/τ, p = softmax(s), S the nucleus of
    :func:`measure.nucleus_mask` (the same rule, on the same fp32 p), q = p renormalized on S:

        ∂ log q(y)/∂z_v = (1[v=y] − q_v)/τ,   ∂h/∂z_v = −q_v (log q_v + h)/τ   (v ∈ S, else 0),
        ∂ log p(y)/∂z_v = (1[v=y] − p_v)/τ.

    ``entropy="tempered_full"``: h is the full-vocabulary entropy of p (:func:`measure.full_entropy`), with
    ∂h/∂z_v = −p_v (log p_v + h)/τ for every v; with top_p = 1 this is the sampler branch itself.

    Memory and passes: two ``[R, V]`` fp32 buffers, no other allocation of that size — ``logits``
    itself when ``overwrite`` (and it is fp32) and ``workspace`` (a preallocated fp32 tensor of
    at least R·V elements), reused chunk after chunk. One exp per element. The returned gradient
    lives in one of the two buffers (consume it before reusing them). ``keep_tokens`` as in
    :func:`measure.score_tokens` (S ∪ {y}; ``in_nucleus`` reports membership of S itself).
    """
    with torch.no_grad():
        rows, V = logits.shape
        if overwrite and logits.dtype == torch.float32 and logits.is_contiguous():
            z = logits
        else:
            z = logits.float()
            if z.data_ptr() == logits.data_ptr():
                z = z.clone()
        if workspace is not None and workspace.dtype == torch.float32 and workspace.numel() >= rows * V:
            p = workspace.view(-1)[: rows * V].view(rows, V)
        else:
            p = torch.empty_like(z)
        if temperature != 1.0:
            z.div_(temperature)
        index = tokens[:, None]
        c_h, c_q, c_p = coef_entropy, coef_log_q, coef_tempered
        grad_wanted = any(c is not None for c in (c_h, c_q, c_p))
        inv_tau = 1.0 / temperature
        out: dict[str, Tensor] = {}
        torch.softmax(z, dim=-1, out=p)  # p = softmax(z/τ), as nucleus_mask computes it
        lse_all = z.amax(-1) - p.amax(-1).log()  # log Σ exp(s): the max of p is exp(0)/Σ exp(s − max s)
        token_z = z.gather(-1, index).squeeze(-1)
        if want_tempered:
            out["tempered_log_p"] = token_z - lse_all
        if not want_q:
            if c_p is None:
                return out, (torch.zeros_like(z) if grad_wanted else None)
            grad = p.mul_((-c_p * inv_tau)[:, None])  # −c_p p / τ
            grad.scatter_add_(-1, index, (c_p * inv_tau)[:, None].to(grad.dtype))
            return out, grad
        if entropies.get(entropy).full_vocabulary and top_p < 1.0:
            return _tempered_full_scores(z, p, index, token_z, lse_all, out, top_p, inv_tau, c_h, c_q, c_p,
                                         grad_wanted, keep_tokens)
        separate_p = None
        if top_p < 1.0:
            mask = nucleus_from_probs(p, top_p)
            in_nucleus = mask.gather(-1, index).squeeze(-1)
            if keep_tokens:
                mask.scatter_(-1, index, True)
            if c_p is not None:  # the tempered term needs p itself, q differs from it
                separate_p = p.clone()
            p.masked_fill_(~mask, 0.0)
            mass = p.sum(-1)
            p.div_(mass[:, None])  # q: p renormalized on S, 0 outside
            lse = lse_all + mass.log()
        else:
            mask = None
            lse = lse_all
            in_nucleus = torch.ones(rows, dtype=torch.bool, device=z.device)
        q = p
        log_q = z.sub_(lse[:, None])  # log q on S
        if mask is not None:
            log_q.masked_fill_(~mask, 0.0)  # finite outside S (q = 0 there): no 0·(−inf)
        out["token_log_q"] = torch.where(in_nucleus | keep_tokens, token_z - lse, float("-inf"))
        out["in_nucleus"] = in_nucleus
        entropy = -torch.bmm(q.unsqueeze(1), log_q.unsqueeze(2)).view(rows)
        out["entropy"] = entropy
        if not grad_wanted:
            return out, None
        # coefficient of the one-hot at y and of −q: the score of log q, and of log p when p = q
        on_q = torch.zeros(rows, dtype=z.dtype, device=z.device)
        if c_q is not None:
            on_q = on_q + c_q
        if c_p is not None and separate_p is None:
            on_q = on_q + c_p
        if c_h is not None:
            # −c_h q (log q + h) − on_q q  =  q · (−c_h log q − (c_h h + on_q)), all over τ
            grad = log_q.mul_((-c_h * inv_tau)[:, None]).add_((-(c_h * entropy + on_q) * inv_tau)[:, None]).mul_(q)
        else:
            grad = q.mul_((-on_q * inv_tau)[:, None])
        grad.scatter_add_(-1, index, (on_q * inv_tau)[:, None])
        if separate_p is not None:
            grad.sub_(separate_p.mul_((c_p * inv_tau)[:, None]))
            grad.scatter_add_(-1, index, (c_p * inv_tau)[:, None].to(grad.dtype))
        return out, grad


def _tempered_full_scores(z: Tensor, p: Tensor, index: Tensor, token_z: Tensor, lse_all: Tensor,
                          out: dict[str, Tensor], top_p: float, inv_tau: float, c_h: Tensor | None,
                          c_q: Tensor | None, c_p: Tensor | None, grad_wanted: bool, keep_tokens: bool = False):
    """The ``tempered_full`` branch of :func:`scores_with_logit_gradient` with top_p < 1, in its two
    ``[R, V]`` buffers: ``z`` (s = z/τ) and ``p`` (softmax(s)); ``lse_all`` = log Σ exp(s). With
    h = −Σ_V p log p (all tokens) and q = p renormalized on the nucleus S, the logit gradient of
    F = Σ_r [c_h h_r + c_q log q_r(y_r) + c_p log p_r(y_r)] is

        ∂F/∂z_v = [−c_h p_v (log p_v + h) − c_q q_v − c_p p_v + (c_q + c_p) 1[v=y]] / τ.

    ``keep_tokens``: S ∪ {y} as the nucleus of q (:func:`measure.score_tokens`).
    """
    rows = z.shape[0]
    mask = nucleus_from_probs(p, top_p)
    in_nucleus = mask.gather(-1, index).squeeze(-1)
    if keep_tokens:
        mask.scatter_(-1, index, True)
    log_p = z.sub_(lse_all[:, None])
    entropy = -torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(rows)
    out["entropy"] = entropy
    grad = None
    if grad_wanted:
        if c_h is not None:  # −c_h p (log p + h) / τ, in log p's buffer
            grad = log_p.add_(entropy[:, None]).mul_(p).mul_((-c_h * inv_tau)[:, None])
        else:
            grad = log_p.zero_()
        if c_p is not None:
            grad.addcmul_(p, (-c_p * inv_tau)[:, None])
    q = p.masked_fill_(~mask, 0.0)
    mass = q.sum(-1)
    lse = lse_all + mass.log()
    out["token_log_q"] = torch.where(in_nucleus | keep_tokens, token_z - lse, float("-inf"))
    out["in_nucleus"] = in_nucleus
    if not grad_wanted:
        return out, None
    on_y = torch.zeros(rows, dtype=z.dtype, device=z.device)
    if c_q is not None:
        grad.addcmul_(q, (-c_q * inv_tau / mass)[:, None])
        on_y = on_y + c_q
    if c_p is not None:
        on_y = on_y + c_p
    grad.scatter_add_(-1, index, (on_y * inv_tau)[:, None])
    return out, grad
