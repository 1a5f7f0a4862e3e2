"""Batched sampling from the measure q (DESIGN §2), recording log q and RB entropies on the fly.

Transformers' own warpers are all switched off and generation is greedy: one logits processor
applies the temperature and the nucleus of :mod:`entropy_probe.measure` (so the sampler and
teacher forcing share the same function on the same fp32 logits) and adds the explicit Gumbel
noise of :mod:`entropy_probe.noise`, so the argmax is the Gumbel-max sample
y_k = argmax_v [log q_k(v) + g_kv], an exact draw from q_k. The noise is keyed by (seed, stream,
prompt slot, response index, position, token): a response slot gets the same noise whatever the
parameters, the batch layout or the device (DESIGN §2b, coupled fresh rollouts).

A response ends at its first EOS (included, and scored) or, with ``stop_strings``, at the token
that completes a stop string (included too): a stopping criterion, which never touches the
logits, so the sampling measure is the same with or without stop strings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from . import measure, noise, precision

# Dense noise is computed in blocks of rows of at most this many [rows, V] elements (three
# buffers of 8 bytes each); a nucleus smaller than 1/_SPARSE_RATIO of the vocabulary only gets
# noise where it is needed.
_NOISE_BLOCK_ELEMENTS = 1 << 24
_SPARSE_RATIO = 8


class SamplingMeasureProcessor(LogitsProcessor):
    """Turns the raw logits into the Gumbel-perturbed log q, ``log q + g`` (float64, −inf outside
    the nucleus), whose argmax is a draw from q, and records, per step, the RB entropy h_k, the
    full-vocabulary tempered entropy (:func:`measure.full_entropy`; the same tensor when
    top_p = 1) and the log q (without noise) of the token drawn at that step (read back one step
    later from ``input_ids``; the last step's token is read by :meth:`finish`).

    Row r of the batch is response ``responses[r]`` of prompt slot ``slots[r]``; its noise at
    response position k (= number of response tokens before it: ``input_ids`` width minus
    ``prompt_width``) is :func:`entropy_probe.noise.gumbel` of (key, slot, response, k, v).
    Holds one ``[B, V]`` row of log q at a time, never ``[B, T, V]``, and reuses its noise buffers
    from step to step.
    """

    def __init__(self, temperature: float, top_p: float, noise_key: noise.NoiseKey, slots: Tensor,
                 responses: Tensor, prompt_width: int):
        self.temperature, self.top_p, self.prompt_width = temperature, top_p, prompt_width
        self.entropies: list[Tensor] = []
        self.tempered_entropies: list[Tensor] = []
        self.token_log_q: list[Tensor] = []
        self._previous_log_q: Tensor | None = None
        self._slot_state = noise.slot_state(noise_key, slots, responses)
        self._buffers: dict[str, Tensor] = {}

    def _record_previous(self, sampled: Tensor) -> None:
        if self._previous_log_q is not None:
            self.token_log_q.append(self._previous_log_q.gather(-1, sampled[:, None]).squeeze(-1))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._record_previous(input_ids[:, -1])
        mask = measure.nucleus_mask(scores, self.temperature, self.top_p)
        lq = measure.log_q(scores, mask, self.temperature)
        self.entropies.append(measure.rb_entropy(lq, mask))
        self.tempered_entropies.append(self.entropies[-1] if self.top_p >= 1.0
                                       else measure.full_entropy(scores, self.temperature))
        self._previous_log_q = lq
        return self.perturbed_log_q(lq, mask, input_ids.shape[1] - self.prompt_width)

    def perturbed_log_q(self, lq: Tensor, mask: Tensor, position: int) -> Tensor:
        """``log q + g`` ``[B, V]`` float64 (−inf outside the nucleus ``mask``) at response
        position ``position``. The returned tensor is a reused buffer: valid until the next call."""
        state = noise.at_position(tuple(x.to(lq.device) for x in self._slot_state), position)
        rows, V = lq.shape
        out = self._buffer("perturbed", (rows, V), torch.float64, lq.device)
        if self.top_p < 1.0 and int(mask.sum()) * _SPARSE_RATIO < rows * V:  # noise only inside the nucleus
            kept = mask.nonzero(as_tuple=True)
            g = noise.gumbel_from_state((state[0][kept[0]], state[1][kept[0]]), kept[1])
            out.fill_(float("-inf"))
            out[kept] = g.add_(lq[kept])
            return out
        block = max(1, _NOISE_BLOCK_ELEMENTS // V)
        scratch = self._buffer("scratch", (2 * min(rows, block) * V,), torch.int64, lq.device)
        tokens = torch.arange(V, dtype=torch.int64, device=lq.device)[None, :]
        for lo in range(0, rows, block):
            part = out[lo:lo + block]
            noise.gumbel_from_state((state[0][lo:lo + block, None], state[1][lo:lo + block, None]), tokens,
                                    out=part, scratch=scratch)
            part.add_(lq[lo:lo + block])  # −inf outside the nucleus stays −inf
        return out

    def _buffer(self, name: str, shape: tuple[int, ...], dtype, device) -> Tensor:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.device != torch.device(device):
            buffer = self._buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def finish(self, sequences: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-step (token log q, RB entropy, full tempered entropy), each ``[B, steps]``."""
        self._record_previous(sequences[:, -1])
        return (torch.stack(self.token_log_q, 1), torch.stack(self.entropies, 1),
                torch.stack(self.tempered_entropies, 1))


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


KV_CACHES = ("dynamic", "static")
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
    entropies: Tensor  # [B*G, T] fp32, 0 past the end: RB entropy of q (estimator.entropy: sampler)
    tempered_entropies: Tensor  # [B*G, T] fp32, 0 past the end: full tempered entropy (tempered_full)


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
    noise_key: noise.NoiseKey,
    slots,
    stop_strings: list[str] | tuple[str, ...] = (),
    tokenizer=None,
    autocast_dtype=None,
    kv_cache: str = "dynamic",
) -> Rollouts:
    """Sample ``num_responses`` responses for each left-padded prompt row from q by Gumbel-max.

    prompt_ids / prompt_mask: ``[B, P]``. Responses of prompt b are rows ``b*G .. b*G+G-1``.
    ``slots`` ``[B]`` (ints): the global slot index of each prompt row in its batch; response g of
    row b uses the noise of key (``noise_key``, slots[b], g, k, v), so the same slot draws the same
    response whatever else is in the call (up to float rounding of the logits).
    ``stop_strings`` (decoded with ``tokenizer``) end a response too (see :func:`response_ends`).
    ``autocast_dtype`` (``model.precision``: "bfloat16" or a torch dtype; None/"float32" = fp32)
    runs the model under autocast; the processor scores the fp32 logits, the noise is float64.
    ``kv_cache`` (``generation.kv_cache``): transformers' ``dynamic`` cache (grows with the
    response) or ``static`` (preallocated to prompt width + max_new_tokens, the layout
    transformers compiles on CUDA); the same responses either way (to float rounding).
    """
    if kv_cache not in KV_CACHES:
        raise ValueError(f"generation.kv_cache: {kv_cache!r} is not one of {KV_CACHES}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer")
    slots = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
    if slots.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"{slots.shape[0]} slots for {prompt_ids.shape[0]} prompt rows")
    # A PEFT model generates through its base model (the adapter layers are inside it); its
    # generation_config is the one to hide.
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    ids = prompt_ids.repeat_interleave(num_responses, 0).to(device)
    mask = prompt_mask.repeat_interleave(num_responses, 0).to(device)
    processor = SamplingMeasureProcessor(
        temperature, top_p, noise_key, slots.repeat_interleave(num_responses).to(device),
        torch.arange(num_responses, dtype=torch.int64).repeat(slots.shape[0]).to(device), ids.shape[1],
    )
    # greedy: the argmax of log q + g is the sample. Greedy decoding applies none of transformers'
    # warpers (top_k is left unset: set to 0, transformers warns that greedy ignores it).
    config = GenerationConfig(
        do_sample=False, top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None,
        **({"cache_implementation": "static"} if kv_cache == "static" else {}),
    )
    criteria = StoppingCriteriaList()
    stop = None
    if stop_strings:
        stop = StopStringCriterion(tokenizer, list(stop_strings), ids.shape[1], ids.shape[0], eos_token_id)
        criteria.append(stop)
    # transformers fills every option left unset from the checkpoint's generation_config.json
    # (repetition_penalty, min_p, min_new_tokens, ...), which would silently change q: hide it.
    checkpoint_config, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with torch.no_grad(), precision.autocast(device, precision.autocast_dtype(autocast_dtype)):
            sequences = model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config,
                logits_processor=LogitsProcessorList([processor]), stopping_criteria=criteria,
            )
    finally:
        model.generation_config = checkpoint_config
    tokens = sequences[:, ids.shape[1]:]
    token_log_q, entropies, tempered_entropies = processor.finish(sequences)
    lens, stopped, reason = response_ends(tokens, eos_token_id, None if stop is None else stop.stop_index)
    valid = torch.arange(tokens.shape[1], device=device)[None, :] < lens[:, None]
    return Rollouts(
        response_tokens=torch.where(valid, tokens, pad_token_id).cpu(),
        response_lens=lens.cpu(),
        stopped_at_eos=stopped.cpu(),
        stop_reason=reason.cpu(),
        token_log_q=torch.where(valid, token_log_q, 0.0).float().cpu(),
        entropies=torch.where(valid, entropies, 0.0).float().cpu(),
        tempered_entropies=torch.where(valid, tempered_entropies, 0.0).float().cpu(),
    )


def _crop_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the leading columns that are padding in every row (left padding to a longer prompt)."""
    used = mask.bool().any(0).nonzero()
    start = int(used[0]) if used.numel() else 0
    return ids[:, start:], mask[:, start:]


def _pad_right(x: Tensor, width: int, value) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=value)


def sample_groups(model, prompt_ids: Tensor, prompt_mask: Tensor, num_responses: int, *, slots,
                  rows_per_call: int, pad_token_id: int, **sampling) -> Rollouts:
    """:func:`sample` over many prompt rows, ``rows_per_call`` whole prompt groups per call, each
    call's prompts cropped to its longest: one :class:`Rollouts` of every row, responses
    right-padded to the longest (the pad id, zeros for the per-token values). The responses do
    not depend on ``rows_per_call`` (the noise is keyed by slot) beyond float rounding of the
    logits. ``sampling``: the keyword arguments of :func:`sample`."""
    slots = [int(s) for s in slots]
    parts = []
    for lo in range(0, prompt_ids.shape[0], max(1, rows_per_call)):
        ids, mask = _crop_left(prompt_ids[lo:lo + rows_per_call], prompt_mask[lo:lo + rows_per_call])
        parts.append(sample(model, ids, mask, num_responses, slots=slots[lo:lo + rows_per_call],
                            pad_token_id=pad_token_id, **sampling))
    width = max(p.response_tokens.shape[1] for p in parts)

    def cat(field: str, value=0) -> Tensor:
        return torch.cat([_pad_right(getattr(p, field), width, value) for p in parts])

    return Rollouts(
        response_tokens=cat("response_tokens", pad_token_id),
        response_lens=torch.cat([p.response_lens for p in parts]),
        stopped_at_eos=torch.cat([p.stopped_at_eos for p in parts]),
        stop_reason=torch.cat([p.stop_reason for p in parts]),
        token_log_q=cat("token_log_q"),
        entropies=cat("entropies"),
        tempered_entropies=cat("tempered_entropies"),
    )
