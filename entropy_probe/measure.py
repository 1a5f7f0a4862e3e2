"""The sampling measure q (DESIGN §2): tempered softmax renormalized on the top-p nucleus.

Every entropy, every log-probability in X and every importance weight uses this one measure.
All functions are pure tensor functions over the last (vocabulary) dimension.
"""
from __future__ import annotations

import torch
from torch import Tensor


_FIRST_TOPK = 64  # nucleus candidates looked at first; rows whose nucleus is larger look again

# Which per-prefix entropy h_k the probe measures (``estimator.entropy``, DESIGN §2b "Which entropy"):
#   sampler        the RB entropy of q_k (nucleus, renormalised): −Σ_{v∈S_k} q_k(v) log q_k(v)
#   tempered_full  the full-vocabulary entropy of p_k = softmax(z_k/τ): −Σ_{v∈V} p_k(v) log p_k(v),
#                  what TRL and verl log as `entropy` (no top-p on the training side)
# Responses are drawn from q either way. With top_p = 1 the two are the same number: every function
# below computes tempered_full as the sampler entropy with the whole vocabulary as the nucleus.
ENTROPIES = ("sampler", "tempered_full")


def check_entropy(entropy: str) -> str:
    if entropy not in ENTROPIES:
        raise ValueError(f"estimator.entropy: unknown entropy {entropy!r} ({' | '.join(ENTROPIES)})")
    return entropy


def nucleus_mask(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The nucleus S_k as a bool mask, ``[..., V] -> [..., V]``.

    p = softmax(z / τ) in fp32; tokens are taken in descending probability (stable sort, so ties
    break by token id) while the mass *before* a token is < top_p, so the token that crosses top_p
    is kept — the rule of transformers' top-p sampler. Never differentiable: S_k is held fixed.

    No full-vocabulary sort: the sorted prefix comes from ``topk`` (64 candidates first, 8× more
    for the rows whose nucleus is larger, the full sort only for rows that need it), and the
    kept set is rebuilt from the sorted values so that ties break by token id exactly as the
    stable sort does (see :func:`_nucleus_from_probs`).
    """
    with torch.no_grad():
        if top_p >= 1.0:
            return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        probs = torch.softmax(logits.detach().float() / temperature, dim=-1)
        return _nucleus_from_probs(probs, top_p)


def _nucleus_from_probs(probs: Tensor, top_p: float) -> Tensor:
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
    h = rb_entropy(lq, mask) if check_entropy(entropy) == "sampler" else full_entropy(logits, temperature)
    return token_log_q, h, in_nucleus


def tempered_token_log_prob(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    """log softmax(z/τ)(y_k), ``[..., V], [...] -> [...]``: the log-prob trainers use in the
    GRPO objective (no top-p truncation, DESIGN §2 "Y and v")."""
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def scores_with_logit_gradient(
    logits: Tensor, tokens: Tensor, temperature: float, top_p: float, *, want_q: bool = True,
    want_tempered: bool = False, coef_entropy: Tensor | None = None, coef_log_q: Tensor | None = None,
    coef_tempered: Tensor | None = None, overwrite: bool = False, workspace: Tensor | None = None,
    keep_tokens: bool = False, entropy: str = "sampler",
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-row scores of :func:`score_tokens` / :func:`tempered_token_log_prob` and, when any
    coefficient is given, the gradient of  F = Σ_r [c_h h_r + c_q log q_r(y_r) + c_p log p_r(y_r)]
    with respect to the logits, in closed form (the nucleus S held fixed), without autograd.

    logits ``[R, V]`` (any float dtype, scored in fp32), tokens ``[R]`` (long), coefficients
    ``[R]`` -> ({"token_log_q", "entropy", "in_nucleus", "tempered_log_p"} (those asked for),
    ``[R]`` each; grad ``[R, V]`` fp32 or None). With s = z/τ, p = softmax(s), S the nucleus of
    :func:`nucleus_mask` (the same rule, on the same fp32 p), q = p renormalized on S:

        ∂ log q(y)/∂z_v = (1[v=y] − q_v)/τ,   ∂h/∂z_v = −q_v (log q_v + h)/τ   (v ∈ S, else 0),
        ∂ log p(y)/∂z_v = (1[v=y] − p_v)/τ.

    ``entropy="tempered_full"``: h is the full-vocabulary entropy of p (:func:`full_entropy`), with
    ∂h/∂z_v = −p_v (log p_v + h)/τ for every v; with top_p = 1 this is the sampler branch itself.

    Memory and passes: two ``[R, V]`` fp32 buffers, no other allocation of that size — ``logits``
    itself when ``overwrite`` (and it is fp32) and ``workspace`` (a preallocated fp32 tensor of
    at least R·V elements), reused chunk after chunk. One exp per element. The returned gradient
    lives in one of the two buffers (consume it before reusing them). ``keep_tokens`` as in
    :func:`score_tokens` (S ∪ {y}; ``in_nucleus`` reports membership of S itself).
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
        if check_entropy(entropy) == "tempered_full" and top_p < 1.0:
            return _tempered_full_scores(z, p, index, token_z, lse_all, out, top_p, inv_tau, c_h, c_q, c_p,
                                         grad_wanted, keep_tokens)
        separate_p = None
        if top_p < 1.0:
            mask = _nucleus_from_probs(p, top_p)
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

    ``keep_tokens``: S ∪ {y} as the nucleus of q (:func:`score_tokens`).
    """
    rows = z.shape[0]
    mask = _nucleus_from_probs(p, top_p)
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
