"""The teacher-forcing layout of stored responses (DESIGN §3 "teacher-force shards").

A rollout shard stores, per prompt group, the left-padded prompt followed by the right-padded
response. Teacher forcing re-lays each sequence right-padded (prompt, response, pad), so positions
start at 0 without position ids and causal attention alone hides the pads; passes then score only
the valid response tokens, ``tf_batch_size`` sequences per forward pass (longest first, less
padding) and the output embedding ``chunk_tokens`` response tokens at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 1024  # response tokens whose [chunk, V] fp32 logits live at once


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



def length_sorted_batches(batch: TokenBatch, batch_size: int) -> list[Tensor]:
    """Row indices in chunks of ``batch_size``, longest sequences first (less padding)."""
    order = torch.argsort(batch.prompt_lens + batch.response_lens, descending=True, stable=True)
    return list(order.split(batch_size))



def chunk_sizes(total: int, chunk_tokens: int | None) -> list[int]:
    """Sizes of consecutive chunks of at most ``chunk_tokens`` (default :data:`DEFAULT_CHUNK_TOKENS`)."""
    size = max(1, int(chunk_tokens or DEFAULT_CHUNK_TOKENS))
    return [min(size, total - start) for start in range(0, total, size)] or [0]


def valid_pairs(batch: TokenBatch, device) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, token) of every valid response token, ``[R]`` each, row-major."""
    valid = batch.response_mask.to(device)
    rows, cols = valid.nonzero(as_tuple=True)
    return rows, cols, batch.response_tokens.to(device)[rows, cols]


def scatter_tokens(values: Tensor, rows: Tensor, cols: Tensor, shape) -> Tensor:
    """``[R]`` values at (rows, cols) of a zero ``[n, T]`` tensor (differentiable, forward AD too)."""
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_put((rows, cols), values)
