"""Batched teacher forcing of stored responses: per-token log q, RB entropies and tempered
log-probs, with or without the autograd graph (DESIGN §3 "teacher-force shards").

Sequences are re-laid right-padded (prompt, response, pad), so positions start at 0 without
position ids and no attention row is fully masked; only the response positions go through the
output embedding. ``tf_batch_size`` sequences per forward pass, sorted by length to cut padding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

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


class ResponseLogits(nn.Module):
    """logits z_k scoring each response token, ``[n, T, V]``: the decoder on the full sequence,
    then the output embedding on the response positions only. A module, so that
    ``torch.func.functional_call`` can evaluate it at other parameters (keys as in the policy,
    prefixed ``policy.``)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_lens: Tensor, width: int) -> Tensor:
        hidden = self.policy.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        positions = (prompt_lens[:, None] - 1 + torch.arange(width, device=hidden.device)[None, :])
        positions = positions.clamp(max=hidden.shape[1] - 1)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.policy.get_output_embeddings()(picked)


@dataclass
class Scores:
    """Per-token quantities of a batch, ``[n, T]``, zero past each response's end."""

    token_log_q: Tensor | None = None  # log q_k(y_k)
    entropy: Tensor | None = None  # h_k (RB)
    tempered_log_p: Tensor | None = None  # log softmax(z_k/τ)(y_k)


def score(
    scorer: ResponseLogits, batch: TokenBatch, temperature: float, top_p: float, *,
    want_q: bool = True, want_tempered: bool = False, params: dict | None = None,
) -> Scores:
    """Score a batch (graph kept when grad mode is on). With ``params``, evaluate at those
    parameters via ``functional_call`` (the model is not modified). A stored response token
    outside its recomputed nucleus is an error (the stored shard does not come from q)."""
    device = next(scorer.parameters()).device
    args = (batch.input_ids.to(device), batch.attention_mask.to(device), batch.prompt_lens.to(device),
            batch.response_tokens.shape[1])
    logits = scorer(*args) if params is None else torch.func.functional_call(scorer, params, args)
    tokens = batch.response_tokens.to(device)
    valid = batch.response_mask.to(device)
    out = Scores()
    if want_q:
        token_log_q, entropy, in_nucleus = measure.score_tokens(logits, tokens, temperature, top_p)
        outside = valid & ~in_nucleus
        if outside.any():
            row, pos = outside.nonzero()[0].tolist()
            raise ValueError(
                f"response token {tokens[row, pos].item()} at position {pos} of batch row {row} lies outside "
                f"its nucleus (top_p={top_p}, temperature={temperature}): the shard was not sampled from this q"
            )
        out.token_log_q = torch.where(valid, token_log_q, 0.0)
        out.entropy = torch.where(valid, entropy, 0.0)
    if want_tempered:
        out.tempered_log_p = torch.where(valid, measure.tempered_token_log_prob(logits, tokens, temperature), 0.0)
    return out


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
    (a parameter with no gradient gets zeros)."""
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in model_params.items()}
    for item in batches:
        for p in model_params.values():
            p.grad = None
        surrogate_fn(item).backward()
        for name, p in model_params.items():
            if p.grad is not None:
                total[name] += p.grad.double()
                p.grad = None
    return total
