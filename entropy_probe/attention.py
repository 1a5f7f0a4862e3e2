"""The attention of the forward-mode (JVP) directional pass.

The SDPA kernels the other passes use have no forward-AD formula, and transformers' eager
attention rounds the attention probabilities to the query's dtype before the weighted sum: in
bf16 (``model.precision: bfloat16``) that is a different function from the fused SDPA kernels,
which accumulate in fp32 (on the embedded policy's `.test` run in bf16, the sum of the RB
entropies moved by −0.064 nats with eager attention against +0.005 with SDPA, from fp32; the
X·v cross-check moved from 5.6% to 4.1%). This one computes scores, softmax and the weighted
sum in fp32 from the (autocast) query, key and value, and casts the output back to the query's
dtype: the numerics of a fused kernel with fp32 accumulation. In fp32 it is eager attention.
"""
from __future__ import annotations

import torch
from torch import Tensor

NAME = "entropy_probe_fp32_accumulate"


def fp32_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   scaling: float, dropout: float = 0.0, **kwargs):
    """(output ``[b, L, heads, d]`` in the query's dtype, None): softmax(q kᵀ·scaling + mask) v in
    fp32, grouped key/value heads repeated. Dropout is refused (the passes run in eval mode)."""
    if dropout and module.training:
        raise ValueError("the directional pass runs the policy in eval mode (no attention dropout)")
    groups = query.shape[1] // key.shape[1]
    with torch.autocast(device_type=query.device.type, enabled=False):
        q = query.float()
        k = key.float().repeat_interleave(groups, dim=1)
        v = value.float().repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[..., : k.shape[-2]].float()
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register :func:`fp32_attention` (with eager attention's mask) under :data:`NAME` with
    transformers; returns the name for ``model.set_attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, fp32_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return NAME
