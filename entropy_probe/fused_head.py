"""The output embedding and the measure fused, for the gradient passes: F = Σ_r [c_h h_r +
c_q log q_r(y_r) + c_p log p_r(y_r)] over response tokens r and its gradient with respect to the
final hidden states and the head's weight and bias, a chunk of tokens at a time, so that no
``[R, V]`` tensor is kept (DESIGN §3; the logit gradient in closed form is
:func:`entropy_probe.logit_gradient.scores_with_logit_gradient`).
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn import functional as F

from . import logit_gradient, measure
from .precision import autocast
from .tf_layout import chunk_sizes

SCORE_NAMES = ("token_log_q", "entropy", "in_nucleus", "tempered_log_p")


def _score_names(want_q: bool, want_tempered: bool) -> list[str]:
    """The per-token columns a pass returns, in :data:`SCORE_NAMES` order."""
    return (list(SCORE_NAMES[:3]) if want_q else []) + (["tempered_log_p"] if want_tempered else [])


class _FusedHeadSurrogate(torch.autograd.Function):
    """F = Σ_r [c_h h_r + c_q log q_r(y_r) + c_p log p_r(y_r)] over response tokens r, through the
    output embedding z = W·hidden + b, a chunk of tokens at a time. The gradient with respect to
    the logits is known in closed form (:func:`logit_gradient.scores_with_logit_gradient`), so each
    chunk's contribution to ∂F/∂hidden, ∂F/∂W and ∂F/∂b is accumulated in the forward and the
    logits are dropped at once: no ``[R, V]`` tensor is kept and the head is applied once.
    Returns (F, per-token columns), the columns not differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, coef_entropy, coef_log_q, coef_tempered, options):
        temperature, top_p, chunk_tokens, compute_dtype, keep_tokens, entropy = options
        want_q = coef_entropy is not None or coef_log_q is not None
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device) if need_hidden else None
        accumulate = torch.float64 if weight.dtype == torch.float64 else torch.float32  # over chunks
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if need_bias else None
        sizes = chunk_sizes(hidden.shape[0], chunk_tokens)
        # two [chunk, V] fp32 buffers reused by every chunk (fresh large allocations cost page faults)
        logits_buffer = torch.empty(sizes[0] * weight.shape[0], dtype=torch.float32, device=hidden.device)
        workspace = torch.empty_like(logits_buffer)
        stats: dict[str, list[Tensor]] = {}
        value = torch.zeros((), dtype=torch.float64, device=hidden.device)
        start = 0
        for size in sizes:
            sl = slice(start, start + size)
            start += size
            h = hidden[sl].to(compute_dtype)
            logits = logits_buffer[: size * weight.shape[0]].view(size, weight.shape[0])
            if compute_dtype == torch.float32:
                torch.mm(h, w.t(), out=logits) if b is None else torch.addmm(b, h, w.t(), out=logits)
            else:
                logits.copy_(F.linear(h, w, b))
            coefs = [c[sl] if c is not None else None for c in (coef_entropy, coef_log_q, coef_tempered)]
            scores, grad_logits = logit_gradient.scores_with_logit_gradient(
                logits, tokens[sl], temperature, top_p, want_q=want_q,
                want_tempered=coef_tempered is not None, coef_entropy=coefs[0], coef_log_q=coefs[1],
                coef_tempered=coefs[2], overwrite=True, workspace=workspace, keep_tokens=keep_tokens,
                entropy=entropy,
            )
            for key, val in scores.items():
                stats.setdefault(key, []).append(val)
            for c, key in zip(coefs, ("entropy", "token_log_q", "tempered_log_p")):
                if c is not None:
                    value += (c.double() * scores[key].double()).sum()
            if need_bias:
                grad_bias += grad_logits.sum(0)
            g = grad_logits.to(compute_dtype)
            if need_hidden:
                torch.mm(g, w, out=grad_hidden[sl])
            if need_weight:
                if compute_dtype == accumulate:
                    grad_weight.addmm_(g.t(), h)
                else:
                    grad_weight += g.t() @ h
            del g, grad_logits, logits
        del logits_buffer, workspace
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        columns = [torch.cat(stats[key]) for key in SCORE_NAMES if key in stats]
        ctx.mark_non_differentiable(*columns)
        return (value.float(), *columns)

    @staticmethod
    def backward(ctx, grad_value, *unused):
        unit = bool(grad_value == 1)  # the passes call F.backward(): no scaling, no copy
        grads = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if g is not None:
                g = g if unit else g * grad_value
                g = g.to(dtype)
            grads.append(g)
        return (*grads, None, None, None, None, None)


def _checkpointed_surrogate(hidden, head, tokens, coefs, temperature, top_p, chunk_tokens, device, autocast_dtype,
                            keep_tokens=False, entropy="sampler"):
    """The fallback of :func:`surrogate` for an output embedding that is not a plain nn.Linear:
    autograd through each chunk, checkpointed (the backward recomputes the chunk's logits)."""
    want_q = coefs[0] is not None or coefs[1] is not None

    def chunk(h, y, c_h, c_q, c_p):
        with autocast(device, autocast_dtype):
            logits = head(h)
        value = torch.zeros((), dtype=torch.float32, device=h.device)
        columns = []
        if want_q:
            token_log_q, h, in_nucleus = measure.score_tokens(logits, y, temperature, top_p,
                                                              keep_tokens=keep_tokens, entropy=entropy)
            columns += [token_log_q.detach(), h.detach(), in_nucleus]
            if c_h is not None:
                value = value + (c_h * h).sum()
            if c_q is not None:
                value = value + (c_q * token_log_q).sum()
        if c_p is not None:
            log_p = measure.tempered_token_log_prob(logits, y, temperature)
            columns.append(log_p.detach())
            value = value + (c_p * log_p).sum()
        return (value, *columns)

    sizes = chunk_sizes(hidden.shape[0], chunk_tokens)
    split = [c.split(sizes) if c is not None else [None] * len(sizes) for c in coefs]
    parts = [torch.utils.checkpoint.checkpoint(chunk, h, y, *cs, use_reentrant=False)
             for h, y, *cs in zip(hidden.split(sizes), tokens.split(sizes), *split)]
    value = sum(p[0] for p in parts)
    names = _score_names(want_q, coefs[2] is not None)
    return value, {name: torch.cat([p[1 + i] for p in parts]) for i, name in enumerate(names)}



def head_surrogate(hidden: Tensor, head: nn.Module, tokens: Tensor, coefs: tuple, temperature: float, top_p: float,
                   chunk_tokens: int | None, device, autocast_dtype,
                   keep_tokens: bool = False, entropy: str = "sampler") -> tuple[Tensor, dict[str, Tensor]]:
    """(F, per-token scores) for response tokens with final hidden states ``hidden`` ``[R, d]``,
    tokens ``[R]`` and coefficients (c_h, c_q, c_p) ``[R]`` each (None = 0); h is the per-prefix
    entropy ``entropy`` (:data:`entropies.ENTROPY_KINDS`). A plain ``nn.Linear``
    head goes through :class:`_FusedHeadSurrogate` (two ``[chunk, V]`` fp32 buffers, head matmul
    once); any other head (an adapter on it) through autograd, each chunk checkpointed.
    ``keep_tokens``: the nucleus is S ∪ {y} (:func:`measure.score_tokens`)."""
    coef_entropy, coef_log_q, coef_tempered = coefs
    want_q = coef_entropy is not None or coef_log_q is not None
    if type(head) is not nn.Linear:
        return _checkpointed_surrogate(hidden, head, tokens, coefs, temperature, top_p, chunk_tokens, device,
                                       autocast_dtype, keep_tokens, entropy)
    compute_dtype = autocast_dtype if autocast_dtype not in (None, torch.float32) else head.weight.dtype
    value, *columns = _FusedHeadSurrogate.apply(hidden, head.weight, head.bias, tokens, *coefs,
                                                (temperature, top_p, chunk_tokens, compute_dtype, keep_tokens, entropy))
    return value, dict(zip(_score_names(want_q, coef_tempered is not None), columns))
