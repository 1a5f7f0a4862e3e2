"""Rollout shards: G responses for each prompt of one shard, their rewards (and reward outcome
codes, stop reasons), and the per-token log q and both per-prefix entropies recorded at sampling
time (DESIGN §3, §2b "Which entropy": :data:`entropy_probe.entropies.ENTROPY_KINDS`, so that a
change of ``estimator.entropy`` never regenerates rollouts). The advantages are the update's
business (:mod:`entropy_probe.losses`)."""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm import tqdm

from . import entropies, generate, noise, rewards
from .shards import ShardError

log = logging.getLogger(__name__)


def sampled_entropies(tensors: dict[str, Tensor], entropy: str) -> Tensor:
    """The sampling-time per-token entropies ``[B, G, T]`` of kind ``entropy`` (``estimator.entropy``)
    of a rollout (or fresh-rollout) shard's tensors."""
    field = entropies.get(entropy).rollout_field
    if field not in tensors:
        raise ShardError(f"the shard holds no {field!r} (written before both entropies were recorded: "
                         "regenerate the rollouts, e.g. snakemake --forcerun rollout)")
    return tensors[field]


def stored_prompts(tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The left-padded prompts ``[B, P]`` and their attention masks of a rollout shard."""
    P = tensors["sequences"].shape[-1] - tensors["token_log_q"].shape[-1]
    return tensors["sequences"][:, 0, :P], tensors["attention_masks"][:, 0, :P]


def stored_responses(tensors: dict[str, Tensor]) -> Tensor:
    """The right-padded response tokens ``[B, G, T]`` of a rollout shard."""
    return tensors["sequences"][:, :, -tensors["token_log_q"].shape[-1]:]


def response_texts(tokenizer, tokens: Tensor, lens: Tensor, stopped_at_eos: Tensor) -> list[str]:
    """Decoded responses without their final EOS. Other special tokens stay in the text: a
    sampled pad is a real token, and "8<pad>" must not score as the answer "8"."""
    ends = (lens - stopped_at_eos.long()).tolist()
    return tokenizer.batch_decode([row[:end] for row, end in zip(tokens.tolist(), ends)], skip_special_tokens=False)


def encode_prompts(tokenizer, examples: list[dict]) -> dict[str, Tensor]:
    """Left-padded ``input_ids`` / ``attention_mask`` ``[B, P]`` of the prompts: their prepared
    token ids (``prompt_token_ids``, see :mod:`entropy_probe.data`) when present, else the
    tokenized ``prompt`` text."""
    if not all("prompt_token_ids" in e for e in examples):
        return tokenizer([e["prompt"] for e in examples], padding=True, return_tensors="pt")
    width = max(len(e["prompt_token_ids"]) for e in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["prompt_token_ids"])
        ids[row, width - n:] = torch.tensor(e["prompt_token_ids"], dtype=torch.long)
        mask[row, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pad_to(x: Tensor, width: int, value, left: bool) -> Tensor:
    pad = width - x.shape[-1]
    return torch.nn.functional.pad(x, (pad, 0) if left else (0, pad), value=value)


def rollout_shard(
    model, tokenizer, examples: list[dict], prompt_ids: list[int], *, G: int, kind: str,
    shard_index: int, slots, seed: int, temperature: float, top_p: float, max_new_tokens: int,
    rollout_batch_size: int, gen_batch_size: int, reward_fn,
    stop_strings: list[str] | tuple[str, ...] = (), autocast_dtype=None, kv_cache: str = "dynamic",
) -> dict[str, Tensor]:
    """Generate one shard; returns its tensors (shapes: B prompts, G responses, T response width,
    P prompt width; ``sequences`` is the left-padded prompt followed by the right-padded response).
    Per response also ``stop_reason`` (:data:`stopping.STOP_REASONS`) and ``reward_codes``
    (:data:`rewards.OUTCOMES`), int8 ``[B, G]``.

    ``slots`` ``[B]``: the global slot of each prompt, its position in the whole batch's prompt
    list (:func:`entropy_probe.plan.shard_slots`). Response g of slot b is drawn with the noise of
    key (``seed``, stream of ``kind`` (:data:`noise.STREAMS`), b, g, k, v), so the shard's results
    do not depend on ``rollout_batch_size`` or ``gen_batch_size`` (pure execution knobs: prompts
    per chunk, sequences per generate call) beyond float rounding of the logits.

    Prompts are generated longest first (sorted by token count, stable), so each call pads its
    prompts to similar lengths; the shard is put back in plan order. ``autocast_dtype``
    (``model.precision``) and ``kv_cache`` as in :func:`generate.sample`.
    """
    slots = [int(s) for s in slots]
    if len(slots) != len(prompt_ids):
        raise ValueError(f"{len(slots)} slots for {len(prompt_ids)} prompts")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    noise_key = noise.NoiseKey(seed, noise.STREAMS[kind])
    rows_per_call = max(1, gen_batch_size // G)  # whole prompt groups per generate call
    lengths = encode_prompts(tokenizer, [examples[i] for i in prompt_ids])["attention_mask"].sum(-1) if prompt_ids else []
    order = sorted(range(len(prompt_ids)), key=lambda j: -int(lengths[j]))  # longest first, stable
    sorted_ids, sorted_slots = [prompt_ids[j] for j in order], [slots[j] for j in order]
    chunks = []
    starts = range(0, len(prompt_ids), rollout_batch_size)
    for start in tqdm(starts, desc=f"rollout {kind}{shard_index}", unit="chunk"):
        ids = sorted_ids[start:start + rollout_batch_size]
        chunk_slots = sorted_slots[start:start + rollout_batch_size]
        encoded = encode_prompts(tokenizer, [examples[i] for i in ids])
        drawn = generate.sample_groups(
            model, encoded["input_ids"], encoded["attention_mask"], G, slots=chunk_slots, rows_per_call=rows_per_call,
            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, eos_token_id=eos,
            pad_token_id=pad, noise_key=noise_key, stop_strings=stop_strings, tokenizer=tokenizer,
            autocast_dtype=autocast_dtype, kv_cache=kv_cache,
        )
        chunks.append(scored_chunk(tokenizer, drawn, examples, ids, G, reward_fn, encoded["input_ids"],
                                   encoded["attention_mask"]))
    shard = assemble(chunks, sorted_ids, G, pad)
    back = torch.argsort(torch.tensor(order, dtype=torch.int64))  # plan order again
    return {name: t.index_select(0, back) for name, t in shard.items()}


def scored_chunk(tokenizer, drawn: generate.Rollouts, examples: list[dict], prompt_ids: list[int], G: int, reward_fn,
                 prompt_tokens: Tensor, prompt_mask: Tensor) -> dict[str, Tensor]:
    """The responses ``drawn`` for the prompts ``prompt_ids`` (``[B*G]`` rows, prompt-major) with
    their rewards and outcome codes, and their left-padded prompts ``[B, P]``: one chunk of
    :func:`assemble`."""
    responses = {field: getattr(drawn, field) for field in ("response_tokens", "token_log_q", "entropies",
                                                            "tempered_entropies", "response_lens",
                                                            "stopped_at_eos", "stop_reason")}
    texts = response_texts(tokenizer, responses["response_tokens"], responses["response_lens"],
                           responses["stopped_at_eos"])
    golds = [examples[i]["answer"] for i in prompt_ids for _ in range(G)]
    prompts = [examples[i].get("prompt") for i in prompt_ids for _ in range(G)]
    values, codes = rewards.score_with_codes(reward_fn, texts, golds, prompts)
    responses["rewards"] = torch.tensor(values, dtype=torch.float32)
    responses["reward_codes"] = torch.tensor(codes, dtype=torch.int8)
    responses["prompt_tokens"], responses["prompt_mask"] = prompt_tokens, prompt_mask
    return responses


def assemble(chunks: list[dict], prompt_ids: list[int], G: int, pad: int) -> dict[str, Tensor]:
    """The shard's tensors (as :func:`rollout_shard` returns them) from its :func:`scored_chunk`
    chunks, in the order of ``prompt_ids``."""
    P = max(c["prompt_tokens"].shape[1] for c in chunks)
    T = max(c["response_tokens"].shape[1] for c in chunks)
    B = len(prompt_ids)

    def cat(field, width=None, value=0, left=False):
        parts = [c[field] if width is None else _pad_to(c[field], width, value, left) for c in chunks]
        return torch.cat(parts)

    prompt_tokens = cat("prompt_tokens", P, pad, left=True).repeat_interleave(G, 0)
    prompt_mask = cat("prompt_mask", P, 0, left=True).repeat_interleave(G, 0)
    response_tokens = cat("response_tokens", T, pad)
    response_lens = cat("response_lens")
    response_mask = (torch.arange(T)[None, :] < response_lens[:, None]).long()
    rewards_bg = cat("rewards").view(B, G)
    response_lens_bg = response_lens.view(B, G)
    return {
        "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int64),
        "sequences": torch.cat([prompt_tokens, response_tokens], 1).view(B, G, P + T),
        "attention_masks": torch.cat([prompt_mask, response_mask], 1).view(B, G, P + T),
        "prompt_lens": prompt_mask.view(B, G, P)[:, 0].sum(-1),
        "response_lens": response_lens_bg,
        "max_lengths": response_lens_bg.max(-1).values,
        "stopped_at_eos": cat("stopped_at_eos").view(B, G),
        "stop_reason": cat("stop_reason").view(B, G),
        "reward_codes": cat("reward_codes").view(B, G),
        "rewards": rewards_bg,
        "token_log_q": cat("token_log_q", T).view(B, G, T),
        "rb_entropies": cat("entropies", T).view(B, G, T),
        "tempered_entropies": cat("tempered_entropies", T).view(B, G, T),
    }


def check_shapes(tensors: dict[str, Tensor]) -> tuple[int, int, int]:
    """The shard invariants: returns (B, G, width)."""
    B, G, L = tensors["sequences"].shape
    T = tensors["token_log_q"].shape[-1]
    expected = {
        "attention_masks": (B, G, L), "rewards": (B, G), "response_lens": (B, G),
        "prompt_lens": (B,), "max_lengths": (B,), "prompt_ids": (B,), "rb_entropies": (B, G, T),
        "tempered_entropies": (B, G, T),
    }
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"shard tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
    return B, G, L


def rows_in(table: dict[str, Tensor], tensors: dict[str, Tensor], where: str) -> Tensor:
    """Indices of the rows of a whole-batch per-prompt-group table (``prompt_ids`` ``[B]``, e.g.
    the U objective's weights) that hold a rollout shard's prompt groups, in the shard's order
    (the U batch's prompts are distinct)."""
    ids, mine = table["prompt_ids"], tensors["prompt_ids"]
    match = ids[:, None] == mine[None, :]
    if not bool((match.sum(0) == 1).all()):
        raise ShardError(f"{where}: does not hold each prompt group of the rollout shard exactly once "
                         "(a batch table of another run?)")
    return match.int().argmax(0)
