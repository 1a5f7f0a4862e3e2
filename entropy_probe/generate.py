"""Batched sampling from the measure q (DESIGN §2), recording log q and RB entropies on the fly.

Transformers' own warpers are all switched off (``top_k=0, top_p=1, temperature=1``) and one
logits processor applies the temperature and the nucleus of :mod:`entropy_probe.measure`, so the
sampler and teacher forcing share the same function on the same fp32 logits.

A response ends at its first EOS (included, and scored) or, with ``stop_strings``, at the token
that completes a stop string (included too): a stopping criterion, which never touches the
logits, so the sampling measure is the same with or without stop strings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

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


class StopStringCriterion(StoppingCriteria):
    """Stops a row once its decoded response contains a stop string, and records the index of the
    response token that completed it (the first step at which the string appears).

    The check decodes the last ``window`` response tokens of each running row (special tokens
    kept, as the rewards see them); ``window`` is several times the longest stop string in
    characters, so the string (which ends at the newest token) lies well inside it."""

    def __init__(self, tokenizer, stop_strings: list[str], prompt_width: int, num_rows: int, eos_token_id: int):
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.prompt_width, self.eos_token_id = prompt_width, eos_token_id
        self.window = 2 * max(len(s) for s in self.stop_strings) + 16
        self.stop_index = torch.full((num_rows,), -1, dtype=torch.long)  # -1: no stop string (yet)
        self._ended = torch.zeros(num_rows, dtype=torch.bool)  # stop string found or EOS emitted

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
        response = input_ids[:, self.prompt_width:].cpu()
        step = response.shape[1] - 1
        running = (~self._ended).nonzero().squeeze(-1).tolist()
        if running:
            tails = response[running, max(0, step + 1 - self.window):].tolist()
            texts = self.tokenizer.batch_decode(tails, skip_special_tokens=False)
            for row, text in zip(running, texts):
                if any(s in text for s in self.stop_strings):
                    self.stop_index[row] = step
        self._ended |= (self.stop_index >= 0) | (response[:, -1] == self.eos_token_id)
        return (self.stop_index >= 0).to(input_ids.device)


STOP_EOS, STOP_STRING, STOP_MAX_TOKENS = 0, 1, 2
STOP_REASONS = {STOP_EOS: "eos", STOP_STRING: "stop_string", STOP_MAX_TOKENS: "max_new_tokens"}


@dataclass
class Rollouts:
    """One generation call: ``B`` prompts × ``G`` responses, responses right-padded to ``T``."""

    response_tokens: Tensor  # [B*G, T] long
    response_lens: Tensor  # [B*G] long, EOS included when it was emitted
    stopped_at_eos: Tensor  # [B*G] bool
    stop_reason: Tensor  # [B*G] int8: STOP_EOS, STOP_STRING or STOP_MAX_TOKENS
    token_log_q: Tensor  # [B*G, T] fp32, 0 past the end
    entropies: Tensor  # [B*G, T] fp32, 0 past the end


def response_lengths(tokens: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """Length up to and including the first EOS (or the full width when none), and whether EOS
    was emitted. Never looks at pad ids: pad and EOS are often the same token."""
    is_eos = tokens == eos_token_id
    stopped = is_eos.any(-1)
    first_eos = torch.where(stopped, is_eos.int().argmax(-1), tokens.shape[-1] - 1)
    return first_eos + 1, stopped


def response_ends(tokens: Tensor, eos_token_id: int, stop_index: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(length T, stopped at EOS, stop reason) per row. T runs up to and including the first EOS
    or the token that completed a stop string (``stop_index``, -1 = none), whichever comes first;
    else the full width (max_new_tokens). An EOS that completes a stop string counts as EOS."""
    lens, at_eos = response_lengths(tokens, eos_token_id)
    reason = torch.where(at_eos, STOP_EOS, STOP_MAX_TOKENS)
    if stop_index is not None:
        stop_index = stop_index.to(tokens.device)
        by_string = (stop_index >= 0) & (~at_eos | (stop_index + 1 < lens))
        lens = torch.where(by_string, stop_index + 1, lens)
        at_eos = at_eos & ~by_string
        reason = torch.where(by_string, STOP_STRING, reason)
    return lens, at_eos, reason.to(torch.int8)


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
    stop_strings: list[str] | tuple[str, ...] = (),
    tokenizer=None,
) -> Rollouts:
    """Sample ``num_responses`` responses for each left-padded prompt row from q.

    prompt_ids / prompt_mask: ``[B, P]``. Responses of prompt b are rows ``b*G .. b*G+G-1``.
    Reproducible: the global torch RNG is seeded with ``seed`` right before sampling.
    ``stop_strings`` (decoded with ``tokenizer``) end a response too (see :func:`response_ends`).
    """
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer")
    # A PEFT model generates through its base model (the adapter layers are inside it); its
    # generation_config is the one to hide.
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    ids = prompt_ids.repeat_interleave(num_responses, 0).to(device)
    mask = prompt_mask.repeat_interleave(num_responses, 0).to(device)
    processor = SamplingMeasureProcessor(temperature, top_p)
    config = GenerationConfig(
        do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
    )
    criteria = StoppingCriteriaList()
    stop = None
    if stop_strings:
        stop = StopStringCriterion(tokenizer, list(stop_strings), ids.shape[1], ids.shape[0], eos_token_id)
        criteria.append(stop)
    # transformers fills every option left unset from the checkpoint's generation_config.json
    # (repetition_penalty, min_p, min_new_tokens, ...), which would silently change q: hide it.
    checkpoint_config, model.generation_config = model.generation_config, GenerationConfig()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            sequences = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config,
                logits_processor=LogitsProcessorList([processor]), stopping_criteria=criteria,
            )
    finally:
        model.generation_config = checkpoint_config
    tokens = sequences[:, ids.shape[1]:]
    token_log_q, entropies = processor.finish(sequences)
    lens, stopped, reason = response_ends(tokens, eos_token_id, None if stop is None else stop.stop_index)
    valid = torch.arange(tokens.shape[1], device=device)[None, :] < lens[:, None]
    return Rollouts(
        response_tokens=torch.where(valid, tokens, pad_token_id).cpu(),
        response_lens=lens.cpu(),
        stopped_at_eos=stopped.cpu(),
        stop_reason=reason.cpu(),
        token_log_q=torch.where(valid, token_log_q, 0.0).float().cpu(),
        entropies=torch.where(valid, entropies, 0.0).float().cpu(),
    )
