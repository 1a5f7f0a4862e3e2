"""Batched teacher forcing of stored responses: per-token log q, RB entropies and tempered
log-probs, with or without the autograd graph, at the policy's parameters or any others
(DESIGN §3 "teacher-force shards").

The layout (right-padded rows, valid response tokens, chunks) is :mod:`entropy_probe.tf_layout`;
the gradient passes' fused output embedding is :mod:`entropy_probe.fused_head`. The decoder runs
once per batch of ``tf_batch_size`` sequences; the output embedding is applied to the valid
response tokens only, ``chunk_tokens`` of them at a time, so no ``[n, T, V]`` tensor is ever built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn import functional as F

from . import measure, parameters
from .fused_head import head_surrogate
from .precision import autocast
from .tf_layout import TokenBatch, chunk_sizes, scatter_tokens, valid_pairs


class ResponseLogits(nn.Module):
    """The decoder and the output embedding that score each response token. The passes evaluate
    it at other parameters with :func:`entropy_probe.parameters.call_at` on its ``policy`` (keys as
    in the policy).

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
        hidden = self.policy.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # no KV cache kept
        flat = rows * hidden.shape[1] + prompt_lens[rows] - 1 + cols
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)


def response_hidden_and_head(scorer: ResponseLogits, batch: TokenBatch, rows: Tensor, cols: Tensor,
                             params: dict | None = None, autocast_dtype: torch.dtype | None = None):
    """(hidden ``[R, d]``, head) at ``params``: the final hidden states of the response tokens
    (rows, cols) and a function applying the output embedding *at those parameters* to a chunk
    of them, ``[r, d] -> [r, V]`` (for passes that evaluate several parameter points)."""
    device = next(scorer.parameters()).device
    module = scorer.output_embedding

    def run():
        with autocast(device, autocast_dtype):
            hidden = scorer.response_hidden(batch.input_ids.to(device), batch.prompt_lens.to(device), rows, cols)
        state = dict(module.named_parameters()) | dict(module.named_buffers())
        return hidden, state

    hidden, state = run() if params is None else parameters.call_at(scorer.policy, params, run)

    def head(h: Tensor) -> Tensor:
        with autocast(device, autocast_dtype):
            return torch.func.functional_call(module, state, (h,))

    return hidden, head


@dataclass
class Scores:
    """Per-token quantities of a batch, ``[n, T]``, zero past each response's end."""

    token_log_q: Tensor | None = None  # log q_k(y_k)
    entropy: Tensor | None = None  # h_k (the RB entropy of q, or the full tempered one: entropies.ENTROPY_KINDS)
    tempered_log_p: Tensor | None = None  # log softmax(z_k/τ)(y_k)
    outside_nucleus: Tensor | None = None  # [n] per sequence: tokens kept outside their recomputed S_k (bf16)


def _outside(in_nucleus, tokens, rows, cols, temperature, top_p, keep_tokens: bool, n: int) -> Tensor:
    """Per-sequence count ``[n]`` of tokens kept outside their recomputed nucleus (``keep_tokens``),
    or the error of :func:`check_nucleus` for any such token."""
    if not keep_tokens:
        check_nucleus(in_nucleus, tokens, rows, cols, temperature, top_p)
    return torch.zeros(n, dtype=torch.long, device=rows.device).index_add_(0, rows, (~in_nucleus).long()).cpu()


def check_nucleus(in_nucleus: Tensor, tokens: Tensor, rows: Tensor, cols: Tensor, temperature: float, top_p: float):
    if not bool(in_nucleus.all()):
        i = int((~in_nucleus).nonzero()[0])
        raise ValueError(
            f"response token {int(tokens[i])} at position {int(cols[i])} of batch row {int(rows[i])} lies outside "
            f"its nucleus (top_p={top_p}, temperature={temperature}): the shard was not sampled from this q"
        )


def score(
    scorer: ResponseLogits, batch: TokenBatch, temperature: float, top_p: float, *,
    want_q: bool = True, want_tempered: bool = False, params: dict | None = None,
    chunk_tokens: int | None = None, autocast_dtype: torch.dtype | None = None, keep_tokens: bool = False,
    entropy: str = "sampler",
) -> Scores:
    """Score a batch (graph kept when grad mode is on). With ``params``, evaluate at those
    parameters via ``functional_call`` (the model is not modified). A stored response token
    outside its recomputed nucleus is an error (the stored shard does not come from q).

    Only the valid response tokens are scored, ``chunk_tokens`` of them at a time (default
    :data:`DEFAULT_CHUNK_TOKENS`): at most one chunk of ``[chunk, V]`` fp32 logits exists at once.
    In grad mode each chunk is checkpointed, so the backward recomputes its logits instead of
    storing them. ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the decoder and the output
    embedding under autocast; the measure is always computed on fp32 logits. With ``keep_tokens``
    (:func:`entropy_probe.precision.keeps_sampled_tokens`) a token outside its recomputed nucleus
    is kept in it and counted (``Scores.outside_nucleus``) instead of being an error. ``entropy``: which
    per-prefix entropy the ``entropy`` column holds (:data:`entropies.ENTROPY_KINDS`).
    """
    device = next(scorer.parameters()).device
    rows, cols, tokens = valid_pairs(batch, device)
    shape = tuple(batch.response_tokens.shape)

    def run():
        with autocast(device, autocast_dtype):
            hidden = scorer.response_hidden(batch.input_ids.to(device), batch.prompt_lens.to(device), rows, cols)
        head = scorer.output_embedding

        def chunk_scores(h: Tensor, y: Tensor, *head_params):
            with autocast(device, autocast_dtype):
                logits = F.linear(h, *head_params) if head_params else head(h)
            out = []
            if want_q:
                token_log_q, h, in_nucleus = measure.score_tokens(logits, y, temperature, top_p,
                                                                  keep_tokens=keep_tokens, entropy=entropy)
                out += [token_log_q, h, in_nucleus]
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

    columns = run() if params is None else parameters.call_at(scorer.policy, params, run)
    out = Scores()
    if want_q:
        token_log_q, h, in_nucleus = columns[:3]
        out.outside_nucleus = _outside(in_nucleus, tokens, rows, cols, temperature, top_p, keep_tokens, shape[0])
        out.token_log_q = scatter_tokens(token_log_q, rows, cols, shape)
        out.entropy = scatter_tokens(h, rows, cols, shape)
    if want_tempered:
        out.tempered_log_p = scatter_tokens(columns[-1], rows, cols, shape)
    return out


def surrogate(
    scorer: ResponseLogits, batch: TokenBatch, temperature: float, top_p: float, *,
    coef_entropy: Tensor | None = None, coef_log_q: Tensor | None = None, coef_tempered: Tensor | None = None,
    chunk_tokens: int | None = None, autocast_dtype: torch.dtype | None = None, keep_tokens: bool = False,
    entropy: str = "sampler",
) -> tuple[Tensor, Scores]:
    """F = Σ_ik [c^h_ik h_ik + c^q_ik log q_ik(y_ik) + c^p_ik log p_ik(y_ik)] (p: tempered, no
    nucleus) over the valid response tokens, differentiable in the parameters (the nucleus held
    fixed), and the detached per-token :class:`Scores`. Coefficients ``[n, T]`` (None = 0); h is
    the per-prefix entropy ``entropy`` (:data:`entropies.ENTROPY_KINDS`).

    The X and Y passes' objective; the output embedding and its backward go through
    :func:`entropy_probe.fused_head.head_surrogate` (two ``[chunk, V]`` fp32 buffers).
    """
    device = next(scorer.parameters()).device
    rows, cols, tokens = valid_pairs(batch, device)
    shape = tuple(batch.response_tokens.shape)
    pick = lambda c: None if c is None else c.to(device, torch.float32)[rows, cols]  # noqa: E731
    coef_entropy, coef_log_q, coef_tempered = pick(coef_entropy), pick(coef_log_q), pick(coef_tempered)
    want_q = coef_entropy is not None or coef_log_q is not None
    if not want_q and coef_tempered is None:
        raise ValueError("surrogate: no coefficient given")
    with autocast(device, autocast_dtype):
        hidden = scorer.response_hidden(batch.input_ids.to(device), batch.prompt_lens.to(device), rows, cols)
    value, stats = head_surrogate(hidden, scorer.output_embedding, tokens, (coef_entropy, coef_log_q, coef_tempered),
                                  temperature, top_p, chunk_tokens, device, autocast_dtype, keep_tokens, entropy)
    out = Scores()
    if want_q:
        out.outside_nucleus = _outside(stats["in_nucleus"], tokens, rows, cols, temperature, top_p, keep_tokens,
                                       shape[0])
        out.token_log_q = scatter_tokens(stats["token_log_q"], rows, cols, shape)
        out.entropy = scatter_tokens(stats["entropy"], rows, cols, shape)
    if coef_tempered is not None:
        out.tempered_log_p = scatter_tokens(stats["tempered_log_p"], rows, cols, shape)
    return value, out


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
