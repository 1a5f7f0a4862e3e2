"""The sampling measure q (DESIGN §2): tempered softmax renormalized on the top-p nucleus, and the
per-prefix entropies of :mod:`entropy_probe.entropies` under it.

Every entropy, every log-probability in X and every importance weight uses this one measure.
All functions are pure tensor functions over the last (vocabulary) dimension. The gradient passes
use the same quantities with their logit gradient in closed form
(:mod:`entropy_probe.logit_gradient`). ``tempered_full`` is computed as the sampler entropy with
the whole vocabulary as the nucleus, so with top_p = 1 the two are the same number, bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import entropies

_FIRST_TOPK = 64  # nucleus candidates looked at first; rows whose nucleus is larger look again


def nucleus_mask(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The nucleus S_k as a bool mask, ``[..., V] -> [..., V]``.

    p = softmax(z / τ) in fp32; tokens are taken in descending probability (stable sort, so ties
    break by token id) while the mass *before* a token is < top_p, so the token that crosses top_p
    is kept — the rule of transformers' top-p sampler. Never differentiable: S_k is held fixed.

    No full-vocabulary sort: the sorted prefix comes from ``topk`` (64 candidates first, 8× more
    for the rows whose nucleus is larger, the full sort only for rows that need it), and the
    kept set is rebuilt from the sorted values so that ties break by token id exactly as the
    stable sort does (see :func:`nucleus_from_probs`).
    """
    with torch.no_grad():
        if top_p >= 1.0:
            return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
        return nucleus_from_probs(probs, top_p)


def nucleus_from_probs(probs: Tensor, top_p: float) -> Tensor:
    """Nucleus mask of fp32 probabilities ``[..., V]`` (the rule of :func:`nucleus_mask`).

    Per row: the descending prefix of ``topk`` values gives the mass before each sorted position
    (cumsum − value, as a full sort would) and the kept count m; the row is settled once the
    mass before the last candidate reaches top_p (or every token is a candidate). With t the
    m-th largest probability, the stable sort keeps every token with p > t and the first
    m − #{p > t} tokens with p == t in token-id order: that is rebuilt without a sort.
    """
    shape, V = probs.shape, probs.shape[-1]
    flat = probs.reshape(-1, V)
    kept = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    threshold = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    pending = torch.arange(flat.shape[0], device=flat.device)
    k = min(V, _FIRST_TOPK)
    while pending.numel():
        values = flat[pending].topk(k, dim=-1, sorted=True).values
        mass_before = torch.cumsum(values, dim=-1) - values
        keep_sorted = mass_before < top_p
        keep_sorted[:, 0] = True  # the most probable token is always in the nucleus
        settled = ~keep_sorted[:, -1] if k < V else torch.ones_like(keep_sorted[:, -1])
        count = keep_sorted.sum(-1)
        kept[pending[settled]] = count[settled]
        threshold[pending[settled]] = values[settled].gather(-1, (count[settled] - 1)[:, None]).squeeze(-1)
        pending = pending[~settled]
        k = min(V, 8 * k)
    above = flat > threshold[:, None]
    tied = flat == threshold[:, None]
    mask = above | tied
    room = kept - above.sum(-1)  # how many of the tied tokens the stable sort keeps
    overfull = tied.sum(-1) > room
    if overfull.any():  # keep the first `room` tied tokens by token id
        rows = overfull.nonzero().squeeze(-1)
        rank = tied[rows].cumsum(-1)
        mask[rows] = above[rows] | (tied[rows] & (rank <= room[rows, None]))
    return mask.reshape(shape)


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


def full_entropy(logits: Tensor, temperature: float) -> Tensor:
    """The full-vocabulary tempered entropy −Σ_{v∈V} p(v) log p(v), p = softmax(z/τ),
    ``[..., V] -> [...]`` fp32, differentiable: :func:`rb_entropy` of :func:`log_q` with the whole
    vocabulary as the nucleus (so with top_p = 1 it is the sampler's RB entropy, bit for bit)."""
    everything = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    return rb_entropy(log_q(logits, everything, temperature), everything)


def score_tokens(logits: Tensor, tokens: Tensor, temperature: float, top_p: float, *, keep_tokens: bool = False,
                 entropy: str = "sampler"):
    """Per-token log q_k(y_k), entropy h_k and nucleus membership of y_k.

    logits ``[..., V]``, tokens ``[...]`` (long) -> three tensors of shape ``[...]``:
    ``token_log_q`` (fp32, differentiable), ``entropy`` (fp32, differentiable with S_k fixed: the
    RB entropy of q for ``entropy="sampler"``, :func:`full_entropy` for ``"tempered_full"``),
    ``in_nucleus`` (bool). A token outside its nucleus has log q = −inf: callers must check
    ``in_nucleus`` (a sampled token always lies in S_k). With ``keep_tokens`` (the bf16 passes:
    :func:`entropy_probe.precision.keeps_sampled_tokens`) the nucleus is S_k ∪ {y_k};
    ``in_nucleus`` still says whether y_k lay in S_k itself.
    """
    mask = nucleus_mask(logits, temperature, top_p)
    index = tokens.unsqueeze(-1)
    in_nucleus = mask.gather(-1, index).squeeze(-1)
    if keep_tokens:
        mask = mask.scatter(-1, index, True)
    lq = log_q(logits, mask, temperature)
    token_log_q = lq.gather(-1, index).squeeze(-1)
    h = full_entropy(logits, temperature) if entropies.get(entropy).full_vocabulary else rb_entropy(lq, mask)
    return token_log_q, h, in_nucleus


def tempered_token_log_prob(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log softmax(z/τ)(y_k), ``[..., V], [...] -> [...]``: the log-prob trainers use in the
    GRPO objective (no top-p truncation, DESIGN §2 "Y and v")."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
