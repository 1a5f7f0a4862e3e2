"""Batched sampling from the measure q (DESIGN §2), recording log q and RB entropies on the fly.

Transformers' own warpers are all switched off (``top_k=0, top_p=1, temperature=1``) and one
logits processor applies the temperature and the nucleus of :mod:`entropy_probe.measure`, so the
sampler and teacher forcing share the same function on the same fp32 logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from . import measure


class SamplingMeasureProcessor(LogitsProcessor):
    """Turns the raw logits into log q (−inf outside the nucleus) and records, per step, the RB
    entropy h_k and the log q of the token sampled at that step (read back one step later from
    ``input_ids``; the last step's token is read by :meth:`finish`). Holds one ``[B, V]`` row of
    log q at a time, never ``[B, T, V]``."""

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
        self.entropies: list[Tensor] = []
        self.token_log_q: list[Tensor] = []
        self._previous_log_q: Tensor | None = None

    def _record_previous(self, sampled: Tensor) -> None:
        if self._previous_log_q is not None:
            self.token_log_q.append(self._previous_log_q.gather(-1, sampled[:, None]).squeeze(-1))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._record_previous(input_ids[:, -1])
        mask = measure.nucleus_mask(scores, self.temperature, self.top_p)
        lq = measure.log_q(scores, mask, self.temperature)
        self.entropies.append(measure.rb_entropy(lq, mask))
        self._previous_log_q = lq
        return lq

    def finish(self, sequences: Tensor) -> tuple[Tensor, Tensor]:
        """Per-step (token log q, entropy), each ``[B, steps]``."""
        self._record_previous(sequences[:, -1])
        return torch.stack(self.token_log_q, 1), torch.stack(self.entropies, 1)


@dataclass
class Rollouts:
    """One generation call: ``B`` prompts × ``G`` responses, responses right-padded to ``T``."""

    response_tokens: Tensor  # [B*G, T] long
    response_lens: Tensor  # [B*G] long, EOS included when it was emitted
    stopped_at_eos: Tensor  # [B*G] bool
    token_log_q: Tensor  # [B*G, T] fp32, 0 past the end
    entropies: Tensor  # [B*G, T] fp32, 0 past the end


def response_lengths(tokens: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """Length up to and including the first EOS (or the full width when none), and whether EOS
    was emitted. Never looks at pad ids: pad and EOS are often the same token."""
    is_eos = tokens == eos_token_id
    stopped = is_eos.any(-1)
    first_eos = torch.where(stopped, is_eos.int().argmax(-1), tokens.shape[-1] - 1)
    return first_eos + 1, stopped


def sample(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_responses: int,
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int,
) -> Rollouts:
    """Sample ``num_responses`` responses for each left-padded prompt row from q.

    prompt_ids / prompt_mask: ``[B, P]``. Responses of prompt b are rows ``b*G .. b*G+G-1``.
    Reproducible: the global torch RNG is seeded with ``seed`` right before sampling.
    """
    device = next(model.parameters()).device
    ids = prompt_ids.repeat_interleave(num_responses, 0).to(device)
    mask = prompt_mask.repeat_interleave(num_responses, 0).to(device)
    processor = SamplingMeasureProcessor(temperature, top_p)
    config = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
    )
    # transformers fills every option left unset from the checkpoint's generation_config.json
    # (repetition_penalty, min_p, min_new_tokens, ...), which would silently change q: hide it.
    checkpoint_config, model.generation_config = model.generation_config, GenerationConfig()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            sequences = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config,
                logits_processor=LogitsProcessorList([processor]),
            )
    finally:
        model.generation_config = checkpoint_config
    tokens = sequences[:, ids.shape[1]:]
    token_log_q, entropies = processor.finish(sequences)
    lens, stopped = response_lengths(tokens, eos_token_id)
    valid = torch.arange(tokens.shape[1], device=device)[None, :] < lens[:, None]
    return Rollouts(
        response_tokens=torch.where(valid, tokens, pad_token_id).cpu(),
        response_lens=lens.cpu(),
        stopped_at_eos=stopped.cpu(),
        token_log_q=torch.where(valid, token_log_q, 0.0).float().cpu(),
        entropies=torch.where(valid, entropies, 0.0).float().cpu(),
    )
