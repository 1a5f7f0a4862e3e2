"""Batched teacher forcing of stored responses: per-token log q, RB entropies and tempered
log-probs, with or without the autograd graph (DESIGN §3 "teacher-force shards").

Sequences are re-laid right-padded (prompt, response, pad), so positions start at 0 without
position ids and causal attention alone hides the pads. ``tf_batch_size`` sequences per forward
pass, sorted by length to cut padding. Only the valid response tokens go through the output
embedding, ``chunk_tokens`` of them at a time, so no ``[n, T, V]`` tensor is ever built: the
gradient passes (:func:`surrogate`) do the output embedding's backward chunk by chunk in closed
form (:func:`measure.scores_with_logit_gradient`); the no-graph and forward-mode passes
(:func:`score`) just score chunk by chunk.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn import functional as F

from . import measure


@dataclass
class TokenBatch:
    """N flattened sequences in teacher-forcing layout."""

    input_ids: Tensor  # [N, L] prompt + response, right-padded
    attention_mask: Tensor  # [N, L]
    prompt_lens: Tensor  # [N]
    response_tokens: Tensor  # [N, T]
    response_mask: Tensor  # [N, T] bool: position k < T_i

    @property
    def response_lens(self) -> Tensor:
        return self.response_mask.sum(-1)

    def select(self, rows: Tensor) -> "TokenBatch":
        """Rows ``rows``, cropped to their longest sequence and response."""
        total = (self.prompt_lens[rows] + self.response_lens[rows]).max()
        width = int(self.response_lens[rows].max())
        return TokenBatch(
            self.input_ids[rows, :total], self.attention_mask[rows, :total], self.prompt_lens[rows],
            self.response_tokens[rows, :width], self.response_mask[rows, :width],
        )


def from_rollout(tensors: dict[str, Tensor], pad_token_id: int) -> TokenBatch:
    """Re-lay a rollout shard (left-padded prompt | right-padded response, ``[B, G, P+T]``) as
    ``[B*G, P+T]`` right-padded rows; row order is prompt-major (b*G + g)."""
    B, G, L = tensors["sequences"].shape
    T = tensors["token_log_q"].shape[-1]
    P = L - T
    sequences = tensors["sequences"].reshape(B * G, L)
    mask = tensors["attention_masks"].reshape(B * G, L)
    prompt_lens = tensors["prompt_lens"].repeat_interleave(G)
    shift = (P - prompt_lens)[:, None] + torch.arange(L)[None, :]
    inside = shift < L
    index = shift.clamp(max=L - 1)
    return TokenBatch(
        input_ids=torch.where(inside, sequences.gather(1, index), pad_token_id),
        attention_mask=torch.where(inside, mask.gather(1, index), 0),
        prompt_lens=prompt_lens,
        response_tokens=sequences[:, P:],
        response_mask=mask[:, P:].bool(),
    )


DEFAULT_CHUNK_TOKENS = 1024  # response tokens whose [chunk, V] fp32 logits live at once


class ResponseLogits(nn.Module):
    """The decoder and the output embedding that score each response token. A module, so that
    ``torch.func.functional_call`` can evaluate it at other parameters (keys as in the policy,
    prefixed ``policy.``).

    :meth:`forward` returns the full ``[n, T, V]`` logits (a reference; the passes never build
    it): the passes call :meth:`response_hidden` and apply the output embedding a chunk of
    response tokens at a time (:func:`score`, :func:`surrogate`).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_lens: Tensor, width: int) -> Tensor:
        hidden = self.policy.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        positions = (prompt_lens[:, None] - 1 + torch.arange(width, device=hidden.device)[None, :])
        positions = positions.clamp(max=hidden.shape[1] - 1)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.policy.get_output_embeddings()(picked)

    @property
    def output_embedding(self) -> nn.Module:
        return self.policy.get_output_embeddings()

    def response_hidden(self, input_ids: Tensor, prompt_lens: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """Final hidden states that score response token (row, col), ``[R, d]`` for R pairs.

        Rows are right-padded (prompt, response, pad), so causal attention alone keeps every real
        token from seeing the pads: no padding mask is passed (the decoder takes its fused
        causal path); positions start at 0, as without padding.
        """
        hidden = self.policy.get_decoder()(input_ids=input_ids).last_hidden_state
        flat = rows * hidden.shape[1] + prompt_lens[rows] - 1 + cols
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)


class _WithParameters(nn.Module):
    """Runs a function while ``functional_call`` has put other parameters into the scorer."""

    def __init__(self, scorer: ResponseLogits):
        super().__init__()
        self.scorer = scorer

    def forward(self, fn):
        return fn()


def _call_at(scorer: ResponseLogits, params: dict | None, fn):
    """``fn()`` with the scorer's parameters replaced by ``params`` (keys ``policy.<name>``)."""
    if params is None:
        return fn()
    return torch.func.functional_call(_WithParameters(scorer), {f"scorer.{k}": v for k, v in params.items()}, (fn,))


def response_hidden_and_head(scorer: ResponseLogits, batch: TokenBatch, rows: Tensor, cols: Tensor,
                             params: dict | None = None, autocast: torch.dtype | None = None):
    """(hidden ``[R, d]``, head) at ``params``: the final hidden states of the response tokens
    (rows, cols) and a function applying the output embedding *at those parameters* to a chunk
    of them, ``[r, d] -> [r, V]`` (for passes that evaluate several parameter points)."""
    device = next(scorer.parameters()).device
    module = scorer.output_embedding

    def run():
        with _autocast(device, autocast):
            hidden = scorer.response_hidden(batch.input_ids.to(device), batch.prompt_lens.to(device), rows, cols)
        state = dict(module.named_parameters()) | dict(module.named_buffers())
        return hidden, state

    hidden, state = _call_at(scorer, params, run)

    def head(h: Tensor) -> Tensor:
        with _autocast(device, autocast):
            return torch.func.functional_call(module, state, (h,))

    return hidden, head


def autocast_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of ``generation.autocast_dtype``: None for "float32" (no autocast)."""
    if name is None or isinstance(name, torch.dtype):
        return None if name in (None, torch.float32) else name
    dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"generation.autocast_dtype: unknown dtype {name!r} (float32 | bfloat16 | float16)")
    return dtypes[name]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def chunk_sizes(total: int, chunk_tokens: int | None) -> list[int]:
    """Sizes of consecutive chunks of at most ``chunk_tokens`` (default :data:`DEFAULT_CHUNK_TOKENS`)."""
    size = max(1, int(chunk_tokens or DEFAULT_CHUNK_TOKENS))
    return [min(size, total - start) for start in range(0, total, size)] or [0]


@dataclass
class Scores:
    """Per-token quantities of a batch, ``[n, T]``, zero past each response's end."""

    token_log_q: Tensor | None = None  # log q_k(y_k)
    entropy: Tensor | None = None  # h_k (RB)
    tempered_log_p: Tensor | None = None  # log softmax(z_k/τ)(y_k)


def _scatter(values: Tensor, rows: Tensor, cols: Tensor, shape) -> Tensor:
    """``[R]`` values at (rows, cols) of a zero ``[n, T]`` tensor (differentiable, forward AD too)."""
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_put((rows, cols), values)


def _check_nucleus(in_nucleus: Tensor, tokens: Tensor, rows: Tensor, cols: Tensor, temperature: float, top_p: float):
    if not bool(in_nucleus.all()):
        i = int((~in_nucleus).nonzero()[0])
        raise ValueError(
            f"response token {int(tokens[i])} at position {int(cols[i])} of batch row {int(rows[i])} lies outside "
            f"its nucleus (top_p={top_p}, temperature={temperature}): the shard was not sampled from this q"
        )


def valid_pairs(batch: TokenBatch, device) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, token) of every valid response token, ``[R]`` each, row-major."""
    valid = batch.response_mask.to(device)
    rows, cols = valid.nonzero(as_tuple=True)
    return rows, cols, batch.response_tokens.to(device)[rows, cols]


def score(
    scorer: ResponseLogits, batch: TokenBatch, temperature: float, top_p: float, *,
    want_q: bool = True, want_tempered: bool = False, params: dict | None = None,
    chunk_tokens: int | None = None, autocast_dtype: torch.dtype | None = None,
) -> Scores:
    """Score a batch (graph kept when grad mode is on). With ``params``, evaluate at those
    parameters via ``functional_call`` (the model is not modified). A stored response token
    outside its recomputed nucleus is an error (the stored shard does not come from q).

    Only the valid response tokens are scored, ``chunk_tokens`` of them at a time (default
    :data:`DEFAULT_CHUNK_TOKENS`): at most one chunk of ``[chunk, V]`` fp32 logits exists at once.
    In grad mode each chunk is checkpointed, so the backward recomputes its logits instead of
    storing them. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the decoder and the output
    embedding under autocast; the measure is always computed on fp32 logits.
    """
    device = next(scorer.parameters()).device
    rows, cols, tokens = valid_pairs(batch, device)
    shape = tuple(batch.response_tokens.shape)

    def run():
        with _autocast(device, autocast_dtype):
            hidden = scorer.response_hidden(batch.input_ids.to(device), batch.prompt_lens.to(device), rows, cols)
        head = scorer.output_embedding

        def chunk_scores(h: Tensor, y: Tensor, *head_params):
            with _autocast(device, autocast_dtype):
                logits = F.linear(h, *head_params) if head_params else head(h)
            out = []
            if want_q:
                token_log_q, entropy, in_nucleus = measure.score_tokens(logits, y, temperature, top_p)
                out += [token_log_q, entropy, in_nucleus]
            if want_tempered:
                out.append(measure.tempered_token_log_prob(logits, y, temperature))
            return tuple(out)

        # a plain nn.Linear head is applied with its parameters passed explicitly, so that a
        # checkpoint's recomputation uses the very tensors of this call
        head_params = ()
        if type(head) is nn.Linear:
            head_params = (head.weight,) if head.bias is None else (head.weight, head.bias)
        checkpointed = torch.is_grad_enabled() and hidden.requires_grad
        sizes = chunk_sizes(len(rows), chunk_tokens)
        parts = []
        for h, y in zip(hidden.split(sizes), tokens.split(sizes)):
            if checkpointed:
                parts.append(torch.utils.checkpoint.checkpoint(chunk_scores, h, y, *head_params, use_reentrant=False))
            else:
                parts.append(chunk_scores(h, y, *head_params))
        return [torch.cat(column) for column in zip(*parts)]

    columns = _call_at(scorer, params, run)
    out = Scores()
    if want_q:
        token_log_q, entropy, in_nucleus = columns[:3]
        _check_nucleus(in_nucleus, tokens, rows, cols, temperature, top_p)
        out.token_log_q = _scatter(token_log_q, rows, cols, shape)
        out.entropy = _scatter(entropy, rows, cols, shape)
    if want_tempered:
        out.tempered_log_p = _scatter(columns[-1], rows, cols, shape)
    return out


class _FusedHeadSurrogate(torch.autograd.Function):
    """F = Σ_r [c_h h_r + c_q log q_r(y_r) + c_p log p_r(y_r)] over response tokens r, through the
    output embedding z = W·hidden + b, a chunk of tokens at a time. The gradient with respect to
    the logits is known in closed form (:func:`measure.scores_with_logit_gradient`), so each
    chunk's contribution to ∂F/∂hidden, ∂F/∂W and ∂F/∂b is accumulated in the forward and the
    logits are dropped at once: no ``[R, V]`` tensor is kept and the head is applied once.
    Returns (F, per-token columns), the columns not differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, coef_entropy, coef_log_q, coef_tempered, options):
        temperature, top_p, chunk_tokens, compute_dtype = options
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
            scores, grad_logits = measure.scores_with_logit_gradient(
                logits, tokens[sl], temperature, top_p, want_q=want_q,
                want_tempered=coef_tempered is not None, coef_entropy=coefs[0], coef_log_q=coefs[1],
                coef_tempered=coefs[2], overwrite=True, workspace=workspace,
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
        columns = [torch.cat(stats[key]) for key in ("token_log_q", "entropy", "in_nucleus", "tempered_log_p")
                   if key in stats]
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


def _checkpointed_surrogate(hidden, head, tokens, coefs, temperature, top_p, chunk_tokens, device, autocast_dtype):
    """The fallback of :func:`surrogate` for an output embedding that is not a plain nn.Linear:
    autograd through each chunk, checkpointed (the backward recomputes the chunk's logits)."""
    want_q = coefs[0] is not None or coefs[1] is not None

    def chunk(h, y, c_h, c_q, c_p):
        with _autocast(device, autocast_dtype):
            logits = head(h)
        value = torch.zeros((), dtype=torch.float32, device=h.device)
        columns = []
        if want_q:
            token_log_q, entropy, in_nucleus = measure.score_tokens(logits, y, temperature, top_p)
            columns += [token_log_q.detach(), entropy.detach(), in_nucleus]
            if c_h is not None:
                value = value + (c_h * entropy).sum()
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
    names = (["token_log_q", "entropy", "in_nucleus"] if want_q else []) + \
        (["tempered_log_p"] if coefs[2] is not None else [])
    return value, {name: torch.cat([p[1 + i] for p in parts]) for i, name in enumerate(names)}


def surrogate(
    scorer: ResponseLogits, batch: TokenBatch, temperature: float, top_p: float, *,
    coef_entropy: Tensor | None = None, coef_log_q: Tensor | None = None, coef_tempered: Tensor | None = None,
    chunk_tokens: int | None = None, autocast_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Scores]:
    """F = Σ_ik [c^h_ik h_ik + c^q_ik log q_ik(y_ik) + c^p_ik log p_ik(y_ik)] (p: tempered, no
    nucleus) over the valid response tokens, differentiable in the parameters (the nucleus held
    fixed), and the detached per-token :class:`Scores`. Coefficients ``[n, T]`` (None = 0).

    The X and Y passes' objective: the output embedding is applied ``chunk_tokens`` response
    tokens at a time and its backward done in the forward (:class:`_FusedHeadSurrogate`), so
    memory holds two ``[chunk, V]`` fp32 buffers and the head matmul runs once; with an
    output embedding that is not a plain ``nn.Linear`` (an adapter on it), each chunk goes
    through autograd under a checkpoint instead.
    """
    device = next(scorer.parameters()).device
    rows, cols, tokens = valid_pairs(batch, device)
    shape = tuple(batch.response_tokens.shape)
    pick = lambda c: None if c is None else c.to(device, torch.float32)[rows, cols]  # noqa: E731
    coef_entropy, coef_log_q, coef_tempered = pick(coef_entropy), pick(coef_log_q), pick(coef_tempered)
    want_q = coef_entropy is not None or coef_log_q is not None
    if not want_q and coef_tempered is None:
        raise ValueError("surrogate: no coefficient given")
    with _autocast(device, autocast_dtype):
        hidden = scorer.response_hidden(batch.input_ids.to(device), batch.prompt_lens.to(device), rows, cols)
    head = scorer.output_embedding
    coefs = (coef_entropy, coef_log_q, coef_tempered)
    if type(head) is nn.Linear:
        compute_dtype = autocast_dtype if autocast_dtype not in (None, torch.float32) else head.weight.dtype
        value, *columns = _FusedHeadSurrogate.apply(hidden, head.weight, head.bias, tokens, *coefs,
                                                    (temperature, top_p, chunk_tokens, compute_dtype))
        names = (["token_log_q", "entropy", "in_nucleus"] if want_q else []) + \
            (["tempered_log_p"] if coef_tempered is not None else [])
        stats = dict(zip(names, columns))
    else:
        value, stats = _checkpointed_surrogate(hidden, head, tokens, coefs, temperature, top_p, chunk_tokens,
                                               device, autocast_dtype)
    out = Scores()
    if want_q:
        _check_nucleus(stats["in_nucleus"], tokens, rows, cols, temperature, top_p)
        out.token_log_q = _scatter(stats["token_log_q"], rows, cols, shape)
        out.entropy = _scatter(stats["entropy"], rows, cols, shape)
    if coef_tempered is not None:
        out.tempered_log_p = _scatter(stats["tempered_log_p"], rows, cols, shape)
    return value, out


def length_sorted_batches(batch: TokenBatch, batch_size: int) -> list[Tensor]:
    """Row indices in chunks of ``batch_size``, longest sequences first (less padding)."""
    order = torch.argsort(batch.prompt_lens + batch.response_lens, descending=True, stable=True)
    return list(order.split(batch_size))


def selected_parameters(model: nn.Module, name_filter: str = "") -> dict[str, nn.Parameter]:
    """Trainable parameters whose name matches ``name_filter`` (a regex; "" = all). The others
    are frozen for the pass, which also spares their gradient computation."""
    pattern = re.compile(name_filter) if name_filter else None
    chosen = {}
    for name, param in model.named_parameters():
        keep = param.requires_grad and (pattern is None or pattern.search(name) is not None)
        if keep:
            chosen[name] = param
        else:
            param.requires_grad_(False)
    if not chosen:
        raise ValueError(f"estimator.param_filter: {name_filter!r} matches no trainable parameter")
    return chosen


def accumulate_gradient(model_params: dict[str, nn.Parameter], surrogate_fn, batches) -> dict[str, Tensor]:
    """Σ over batches of ∇ surrogate_fn(batch), accumulated in float64 per parameter name
    (a parameter with no gradient gets zeros).

    Each parameter's gradient is added to its float64 total as soon as the backward has
    produced it, and freed (a post-accumulate-grad hook): the fp32 gradients of the whole model
    never coexist with the float64 totals."""
    total: dict[str, Tensor] = {}

    def hook(name):
        def add(p):
            if name in total:
                total[name].add_(p.grad)
            else:
                total[name] = p.grad.to(torch.float64, copy=True)
            p.grad = None
        return add

    handles = []
    try:
        for name, p in model_params.items():
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(hook(name)))
        for item in batches:
            surrogate_fn(item).backward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: total[name] if name in total else torch.zeros_like(p, dtype=torch.float64)
            for name, p in model_params.items()}
