"""Batched sampling from the measure q (DESIGN §2), recording log q and RB entropies on the fly.

Transformers' own warpers are all switched off and generation is greedy: one logits processor
applies the temperature and the nucleus of :mod:`entropy_probe.measure` (so the sampler and
teacher forcing share the same function on the same fp32 logits) and adds the explicit Gumbel
noise of :mod:`entropy_probe.noise`, so the argmax is the Gumbel-max sample
y_k = argmax_v [log q_k(v) + g_kv], an exact draw from q_k. The noise is keyed by (seed, stream,
prompt slot, response index, position, token): a response slot gets the same noise whatever the
parameters, the batch layout or the device (DESIGN §2b, coupled fresh rollouts). How a
response ends: :mod:`entropy_probe.stopping`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from . import measure, noise, precision
from .stopping import RowBudget, StopStringCriterion, response_ends

# Dense noise is computed in blocks of rows of at most this many [rows, V] elements (three
# buffers of 8 bytes each): on CPU small enough that the ~30 integer passes over a block run in
# cache, on a GPU large enough to fill it. A nucleus smaller than 1/_SPARSE_RATIO of the
# vocabulary only gets noise where it is needed.
_NOISE_BLOCK_ELEMENTS = 1 << 24
_NOISE_BLOCK_ELEMENTS_CPU = 1 << 17
_SPARSE_RATIO = 8


def _buffer(buffers: dict, name: str, shape: tuple[int, ...], dtype, device) -> Tensor:
    if name not in buffers or buffers[name].shape != shape or buffers[name].device != torch.device(device):
        buffers[name] = torch.empty(shape, dtype=dtype, device=device)
    return buffers[name]


def perturbed_log_q(lq: Tensor, mask: Tensor, state: tuple[Tensor, Tensor], top_p: float,
                    buffers: dict | None = None) -> Tensor:
    """``log q + g`` ``[R, V]`` float64 (−inf outside the nucleus ``mask``), whose argmax is the
    Gumbel-max draw from q: ``lq`` ``[R, V]`` (:func:`measure.log_q`), ``state`` the noise state
    of each row after its position (:func:`noise.at_position`, ``[R]`` each). Noise only inside
    the nucleus when it is a small part of the vocabulary; else dense, in blocks of rows.
    ``buffers`` (a dict kept by the caller) holds the output and scratch tensors from call to
    call: the returned tensor is then valid until the next call with the same dict."""
    buffers = {} if buffers is None else buffers
    rows, V = lq.shape
    out = _buffer(buffers, "perturbed", (rows, V), torch.float64, lq.device)
    if top_p < 1.0 and int(mask.sum()) * _SPARSE_RATIO < rows * V:  # noise only inside the nucleus
        kept = mask.nonzero(as_tuple=True)
        g = noise.gumbel_from_state((state[0][kept[0]], state[1][kept[0]]), kept[1])
        out.fill_(float("-inf"))
        out[kept] = g.add_(lq[kept])
        return out
    block = max(1, (_NOISE_BLOCK_ELEMENTS_CPU if lq.device.type == "cpu" else _NOISE_BLOCK_ELEMENTS) // V)
    scratch = _buffer(buffers, "scratch", (2 * min(rows, block) * V,), torch.int64, lq.device)
    tokens = torch.arange(V, dtype=torch.int64, device=lq.device)[None, :]
    for lo in range(0, rows, block):
        part = out[lo:lo + block]
        noise.gumbel_from_state((state[0][lo:lo + block, None], state[1][lo:lo + block, None]), tokens,
                                out=part, scratch=scratch)
        part.add_(lq[lo:lo + block])  # −inf outside the nucleus stays −inf
    return out


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
                 responses: Tensor, prompt_width: int, position_offsets: Tensor | None = None):
        self.temperature, self.top_p, self.prompt_width = temperature, top_p, prompt_width
        self.position_offsets = position_offsets  # [B]: response tokens already in the input (a continuation)
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
        position = input_ids.shape[1] - self.prompt_width
        if self.position_offsets is not None:
            position = self.position_offsets.to(input_ids.device) + position
        state = noise.at_position(tuple(x.to(lq.device) for x in self._slot_state), position)
        return perturbed_log_q(lq, mask, state, self.top_p, self._buffers)

    def finish(self, sequences: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-step (token log q, RB entropy, full tempered entropy), each ``[B, steps]``."""
        self._record_previous(sequences[:, -1])
        return (torch.stack(self.token_log_q, 1), torch.stack(self.entropies, 1),
                torch.stack(self.tempered_entropies, 1))


KV_CACHES = ("dynamic", "static")


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


def sample(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    num_responses: int,
    *,
    slots,
    **decoding,
) -> Rollouts:
    """Sample ``num_responses`` responses for each left-padded prompt row from q by Gumbel-max.

    prompt_ids / prompt_mask: ``[B, P]``. Responses of prompt b are rows ``b*G .. b*G+G-1``.
    ``slots`` ``[B]`` (ints): the global slot index of each prompt row in its batch; response g of
    row b uses the noise of key (``noise_key``, slots[b], g, k, v), so the same slot draws the same
    response whatever else is in the call (up to float rounding of the logits).
    ``decoding``: the keyword arguments of :func:`decode`.
    """
    slots = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
    if slots.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"{slots.shape[0]} slots for {prompt_ids.shape[0]} prompt rows")
    return decode(model, prompt_ids.repeat_interleave(num_responses, 0), prompt_mask.repeat_interleave(num_responses, 0),
                  row_slots=slots.repeat_interleave(num_responses),
                  row_responses=torch.arange(num_responses, dtype=torch.int64).repeat(slots.shape[0]), **decoding)


def decode(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    row_slots: Tensor,
    row_responses: Tensor,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    noise_key: noise.NoiseKey,
    stop_strings: list[str] | tuple[str, ...] = (),
    tokenizer=None,
    autocast_dtype=None,
    kv_cache: str = "dynamic",
    prefix_lens: Tensor | None = None,
    prefix_tokens: Tensor | None = None,
) -> Rollouts:
    """Generate one response per left-padded input row ``[R, P]`` by Gumbel-max from q: row r is
    response ``row_responses[r]`` of prompt slot ``row_slots[r]`` (``[R]`` each), its token at
    response position k drawn with the noise of key (``noise_key``, slot, response, k, v).

    A continuation: row r's input ends with the ``prefix_lens[r]`` response tokens already drawn,
    ``prefix_tokens[r, :prefix_lens[r]]`` (``[R]``, ``[R, D]``), so its first new token is at
    position ``prefix_lens[r]``, a stop string may span the prefix, and it generates at most
    ``max_new_tokens - prefix_lens[r]`` tokens; the returned rows hold the new tokens only. ``stop_strings`` (decoded with ``tokenizer``) end a
    response too (see :func:`response_ends`). ``autocast_dtype`` (``model.precision``: "bfloat16"
    or a torch dtype; None/"float32" = fp32) runs the model under autocast; the processor scores
    the fp32 logits, the noise is float64. ``kv_cache`` (``generation.kv_cache``): transformers'
    ``dynamic`` cache (grows with the response) or ``static`` (preallocated to prompt width +
    max_new_tokens, the layout transformers compiles on CUDA); the same responses either way (to
    float rounding).
    """
    if kv_cache not in KV_CACHES:
        raise ValueError(f"generation.kv_cache: {kv_cache!r} is not one of {KV_CACHES}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer")
    # A PEFT model generates through its base model (the adapter layers are inside it); its
    # generation_config is the one to hide.
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(model.parameters()).device
    ids, mask = input_ids.to(device), attention_mask.to(device)
    width = ids.shape[1]
    offsets = budgets = prefixes = None
    if prefix_lens is not None:
        offsets = prefix_lens.to(device=device, dtype=torch.int64)
        budgets = max_new_tokens - offsets
        if bool((budgets < 1).any()):
            raise ValueError("a continuation's prefix already holds max_new_tokens tokens")
        max_new_tokens = int(budgets.max())
    processor = SamplingMeasureProcessor(temperature, top_p, noise_key, row_slots.to(device),
                                         row_responses.to(device), width, position_offsets=offsets)
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
        if prefix_lens is not None:
            prefixes = [row[:n] for row, n in zip(prefix_tokens.tolist(), prefix_lens.tolist())]
        stop = StopStringCriterion(tokenizer, list(stop_strings), width, ids.shape[0], eos_token_id, prefixes)
        criteria.append(stop)
    if budgets is not None:
        criteria.append(RowBudget(budgets, width))
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
    tokens = sequences[:, width:]
    token_log_q, entropies, tempered_entropies = processor.finish(sequences)
    positions = torch.arange(tokens.shape[1], device=device)[None, :]
    stop_index = None if stop is None else stop.stop_index.to(device)
    if budgets is not None:  # what a row generates past its budget (pads) is not part of it
        tokens = torch.where(positions < budgets[:, None], tokens, -1)
        if stop_index is not None:
            stop_index = torch.where(stop_index < budgets, stop_index, -1)
    lens, stopped, reason = response_ends(tokens, eos_token_id, stop_index)
    if budgets is not None:
        lens = torch.minimum(lens, budgets)
    valid = positions < lens[:, None]
    return Rollouts(
        response_tokens=torch.where(valid, tokens, pad_token_id).cpu(),
        response_lens=lens.cpu(),
        stopped_at_eos=stopped.cpu(),
        stop_reason=reason.cpu(),
        token_log_q=torch.where(valid, token_log_q, 0.0).float().cpu(),
        entropies=torch.where(valid, entropies, 0.0).float().cpu(),
        tempered_entropies=torch.where(valid, tempered_entropies, 0.0).float().cpu(),
    )


def crop_left(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
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
        ids, mask = crop_left(prompt_ids[lo:lo + rows_per_call], prompt_mask[lo:lo + rows_per_call])
        parts.append(sample(model, ids, mask, num_responses, slots=slots[lo:lo + rows_per_call],
                            pad_token_id=pad_token_id, **sampling))
    return concatenate(parts, pad_token_id)


def concatenate(parts: list[Rollouts], pad_token_id: int) -> Rollouts:
    """The rows of several :class:`Rollouts`, responses right-padded to the longest (the pad id,
    zeros for the per-token values)."""
    width = max(p.response_tokens.shape[1] for p in parts)

    def cat(name: str) -> Tensor:
        values = [getattr(p, name) for p in parts]
        fill = pad_token_id if name == "response_tokens" else 0
        return torch.cat([x if x.dim() == 1 else _pad_right(x, width, fill) for x in values])

    return Rollouts(**{f.name: cat(f.name) for f in fields(Rollouts)})
