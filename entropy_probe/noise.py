"""Explicit, reusable sampling noise (DESIGN §2b "coupled fresh rollouts").

Every response slot draws its tokens by Gumbel-max, y_k = argmax_v [log q_k(v) + g_kv], an exact
sample from q_k. The Gumbel variates g_kv come from a counter-based generator: a pure function of
the key

    (seed, stream, slot, response, position, token)

and of nothing else, so a slot gets the same noise whatever the parameters θ, the batch layout,
the chunk and call sizes or the device. Redrawing a slot at θ' with the same noise couples the
two draws (most responses are identical for a small step).

Key fields (each an unsigned integer):

=========  ==========  ==========================================================================
field      range       meaning
=========  ==========  ==========================================================================
seed       [0, 2^64)   the run's seed (``batch_config.seed``), absorbed as two 32-bit words
stream     [0, 2^32)   which batch: :data:`STREAM_E` = 0, :data:`STREAM_U` = 1
slot       [0, 2^63)   the prompt's index in its whole batch (plan[kind]["prompt_ids"]), two words
response   [0, 2^32)   g = 0 .. G-1 within the prompt group
position   [0, 2^32)   k = number of response tokens generated before this one (0-based)
token      [0, 2^32)   the vocabulary id v
=========  ==========  ==========================================================================

The generator. A 64-bit state of two 32-bit lanes (a, b) starts at fixed constants and absorbs
the fields in the order of the table (seed low, seed high, stream, slot low, slot high,
response, position, token) with

    a ← mix(a ⊕ f),   b ← mix(b ⊕ a)

where ``mix`` is the 32-bit integer mixer "lowbias32" of Wellons' hash-prospector, variant
[16 21f0aaad 15 735a2d97 15] (x ^= x>>16; x *= 0x21f0aaad; x ^= x>>15; x *= 0x735a2d97;
x ^= x>>15, all mod 2^32). For a fixed field value this step is a bijection of the 64-bit state, and
two values of one field give two different a's, so keys that differ in one 32-bit word end in
different states (keys that differ in several collide with probability ~2^-64). The output words
are (a ⊕ b, b), again a bijection of the state (both depend on the whole key); word a and the top
20 bits of word b form a 52-bit integer m (two different states share it with probability 2^-52), and

    u = (2m + 1) / 2^53  ∈ (0, 1)  (exact in float64),   g = −log(−log u)  ~ Gumbel(0, 1).

With 52 random bits ties and quantization are negligible even at a 152k vocabulary.

Arithmetic: int64 torch tensors holding values < 2^32; both multipliers are < 2^31, so every
product is < 2^63 and nothing relies on signed overflow. All integer steps are exact on every
device, so the 52-bit integers are bit-identical on CPU and CUDA; the final float64 logs may
differ by an ulp between devices, far below anything that changes an argmax.

The per-row part of the key (everything but the token) is absorbed once per row; the token and the
output words are one vectorised pass over ``[rows, V]``: about 30 in-place integer operations
and two float64 logs per element, in three reusable buffers (see :func:`gumbel`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

GENERATOR = "lowbias32-2lane-v1"  # names this key layout and generator (shard metadata)
STREAM_E, STREAM_U = 0, 1
STREAMS = {"E": STREAM_E, "U": STREAM_U}

_MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x21F0AAAD, 0x735A2D97  # both < 2^31: x * M < 2^63 for x < 2^32
_IV_A, _IV_B = 0x243F6A88, 0x85A308D3  # the state before any field (hex digits of pi)
_OUTPUT_BITS_B = 20  # m = the 32 bits of word a, then the top 20 bits of word b
_TWO_POW_MINUS_53 = 2.0 ** -53


@dataclass(frozen=True)
class NoiseKey:
    """The run-wide part of the key: the seed and the batch's stream (:data:`STREAMS`)."""

    seed: int
    stream: int

    def __post_init__(self):
        if not 0 <= int(self.seed) < 2 ** 64:
            raise ValueError(f"noise seed must lie in [0, 2^64), got {self.seed}")
        if not 0 <= int(self.stream) < 2 ** 32:
            raise ValueError(f"noise stream must lie in [0, 2^32), got {self.stream}")


def mix32(x: Tensor, scratch: Tensor | None = None) -> Tensor:
    """The lowbias32 mixer (see the module docstring), in place on an int64 tensor of values in
    [0, 2^32); returns ``x``. A bijection of [0, 2^32). ``scratch`` (same shape as ``x``) holds
    the shifted copies; without it they are allocated."""
    for shift, multiplier in ((16, _M1), (15, _M2)):
        x ^= x >> shift if scratch is None else torch.bitwise_right_shift(x, shift, out=scratch)
        x.mul_(multiplier).bitwise_and_(_MASK32)
    x ^= x >> 15 if scratch is None else torch.bitwise_right_shift(x, 15, out=scratch)
    return x


def _absorb(a: Tensor, b: Tensor, field) -> tuple[Tensor, Tensor]:
    """One absorption step ``a ← mix(a ⊕ f), b ← mix(b ⊕ a)`` (new tensors; broadcasts)."""
    a = mix32(a ^ field)
    b = mix32(b ^ a)
    return a, b


def _words(value: Tensor) -> tuple[Tensor, Tensor]:
    """Low and high 32-bit words of a non-negative int64 tensor."""
    return value & _MASK32, value >> 32


def slot_state(key: NoiseKey, slots: Tensor, responses: Tensor) -> tuple[Tensor, Tensor]:
    """The state (a, b) after seed, stream, slot and response: int64 tensors of the broadcast
    shape of ``slots`` and ``responses``. Computed once per generation call and reused at every
    position (see :func:`at_position`)."""
    slots = torch.as_tensor(slots, dtype=torch.int64)
    responses = torch.as_tensor(responses, dtype=torch.int64, device=slots.device)
    if (slots < 0).any() or (responses < 0).any() or (responses >= 2 ** 32).any():
        raise ValueError("noise key fields must be non-negative (response < 2^32)")
    shape = torch.broadcast_shapes(slots.shape, responses.shape)
    a = torch.full(shape, _IV_A, dtype=torch.int64, device=slots.device)
    b = torch.full(shape, _IV_B, dtype=torch.int64, device=slots.device)
    seed = int(key.seed)
    slot_lo, slot_hi = _words(slots)
    for field in (seed & _MASK32, seed >> 32, int(key.stream), slot_lo, slot_hi, responses):
        a, b = _absorb(a, b, field)
    return a, b


def at_position(state: tuple[Tensor, Tensor], position) -> tuple[Tensor, Tensor]:
    """The state after absorbing the position k (an int, or a tensor that broadcasts)."""
    a, b = state
    if isinstance(position, Tensor):
        position = position.to(device=a.device, dtype=torch.int64)
        if (position < 0).any() or (position >= 2 ** 32).any():
            raise ValueError("noise positions must lie in [0, 2^32)")
    elif not 0 <= int(position) < 2 ** 32:
        raise ValueError(f"noise position must lie in [0, 2^32), got {position}")
    return _absorb(a, b, position)


def uniform(key: NoiseKey, slots: Tensor, responses: Tensor, position, tokens: Tensor) -> Tensor:
    """The uniforms u = (2m + 1)/2^53 of the keys (float64, exact: bit-identical on every device),
    of the broadcast shape of the key fields (as in :func:`gumbel`)."""
    return uniform_from_state(at_position(slot_state(key, slots, responses), position), tokens)


def gumbel(key: NoiseKey, slots: Tensor, responses: Tensor, position, tokens: Tensor, *,
           out: Tensor | None = None, scratch: Tensor | None = None) -> Tensor:
    """Gumbel(0, 1) noise g = −log(−log u) for each key, float64, of the broadcast shape of
    ``slots``, ``responses``, ``position`` and ``tokens`` (int64 tensors; ``position`` may be an int).

    Dense over a vocabulary: ``slots[:, None], responses[:, None], k, arange(V)[None, :]``; sparse
    over chosen entries: four ``[N]`` tensors. Either way each entry is a pure function of its key.
    ``out`` (float64, contiguous, that shape) receives the result; ``scratch`` (int64, at least
    twice its number of elements, contents destroyed) saves the allocations: reuse both.
    """
    return gumbel_from_state(at_position(slot_state(key, slots, responses), position), tokens,
                             out=out, scratch=scratch)


def gumbel_from_state(state: tuple[Tensor, Tensor], tokens: Tensor, *, out: Tensor | None = None,
                      scratch: Tensor | None = None) -> Tensor:
    """:func:`gumbel` from the state after the position (:func:`at_position`)."""
    return uniform_from_state(state, tokens, out=out, scratch=scratch).log_().neg_().log_().neg_()


def uniform_from_state(state: tuple[Tensor, Tensor], tokens: Tensor, *, out: Tensor | None = None,
                       scratch: Tensor | None = None) -> Tensor:
    """:func:`uniform` from the state after the position: absorbs the token, forms the output words
    (a ⊕ b, b), m = their top 32 + 20 bits and u = (2m + 1)/2^53 (buffers as in :func:`gumbel`)."""
    a, b = state
    tokens = torch.as_tensor(tokens, dtype=torch.int64, device=a.device)
    shape = torch.broadcast_shapes(a.shape, tokens.shape)
    n = math.prod(shape)
    if out is None:
        out = torch.empty(shape, dtype=torch.float64, device=a.device)
    if scratch is None:
        scratch = torch.empty(2 * n, dtype=torch.int64, device=a.device)
    word_a, word_b = scratch[:n].view(shape), scratch[n:2 * n].view(shape)
    shifts = out.view(torch.int64)  # out's storage serves as shift scratch until the very end
    torch.bitwise_xor(a, tokens, out=word_a)
    mix32(word_a, shifts)  # a ← mix(a ⊕ v)
    torch.bitwise_xor(b, word_a, out=word_b)
    mix32(word_b, shifts)  # b ← mix(b ⊕ a)
    word_a ^= word_b  # output words (a ⊕ b, b): a bijection of the state
    # 2m + 1 with m = the 32 bits of word a, then the top 20 bits of word b (2m + 1 < 2^53)
    word_a <<= 1 + _OUTPUT_BITS_B
    word_b >>= 32 - _OUTPUT_BITS_B - 1
    word_a |= word_b.bitwise_or_(1)
    return out.copy_(word_a).mul_(_TWO_POW_MINUS_53)  # exact: every value < 2^53


def gumbel_noise(key: NoiseKey, slots: Tensor, responses: Tensor, position: int, vocab_size: int,
                 device=None) -> Tensor:
    """Noise of ``R`` rows over the whole vocabulary: ``slots [R], responses [R] -> [R, V]``
    float64, g[r, v] the noise of key (seed, stream, slots[r], responses[r], position, v)."""
    device = torch.device(device) if device is not None else torch.as_tensor(slots).device
    slots = torch.as_tensor(slots, dtype=torch.int64).to(device)
    responses = torch.as_tensor(responses, dtype=torch.int64).to(device)
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=device)
    return gumbel(key, slots[:, None], responses[:, None], position, tokens[None, :])
