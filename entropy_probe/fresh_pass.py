"""The fresh-rollout pass over one E shard (DESIGN §2b "coupled fresh rollouts"): every response
slot redrawn at θ' = θ + ηv with the noise it was drawn with at θ, under θ''s own sampler (its own
nucleus), recording both per-prefix entropies at sampling time and which responses changed. The
paired statistics over the whole E batch are :mod:`entropy_probe.fresh`.
"""
from __future__ import annotations

from torch import Tensor

from . import entropies, fresh, generate, noise, parameters, rollout as rollouts, verify

METHODS = ("verification", "regeneration")


def fresh_rollout_shard(
    model, tokenizer, rollout: dict[str, Tensor], direction: dict[str, Tensor], eta: float, *, slots, seed: int,
    temperature: float, top_p: float, max_new_tokens: int, gen_batch_size: int,
    stop_strings: list[str] | tuple[str, ...] = (), stream: int = noise.STREAM_E, autocast_dtype=None,
    kv_cache: str = "dynamic", method: str = "verification", tf_batch_size: int = 64, chunk_tokens: int | None = None,
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Redraw every response slot of an E rollout shard at θ' = θ + η·direction with the same noise.

    ``rollout``: the E shard (its prompts, responses and sampling-time entropies at θ); ``slots``
    ``[B]``: each prompt's slot in the whole E batch (:func:`entropy_probe.plan.shard_slots`), so
    response g of slot b gets the noise of key (``seed``, ``stream``, b, g, k, v) exactly as it did
    at θ. Sampling is :func:`generate.sample` under θ''s own sampler (nucleus from θ''s logits),
    with the parameters applied by :func:`parameters.call_at` (the model is never written);
    ``gen_batch_size`` sequences per call (:func:`generate.sample_groups`; execution only). ``autocast_dtype`` (``model.precision``)
    and ``kv_cache`` as in :func:`generate.sample`: the precision of the rollouts at θ.
    ``method``: ``verification`` (:mod:`entropy_probe.verify`: θ''s draws along the stored responses
    from one teacher-forced pass, ``tf_batch_size`` sequences and ``chunk_tokens`` positions at a
    time, generating only after a divergence) or ``regeneration`` (every response token by token);
    the same sample either way, to float near-ties.

    Returns (B prompts, G responses, T' the fresh width): ``response_tokens`` ``[B, G, T']``,
    ``response_lens`` and ``stop_reason`` ``[B, G]``, ``token_log_q``, ``rb_entropies`` and
    ``tempered_entropies`` ``[B, G, T']`` (sampling time, 0 past the end), ``changed`` ``[B, G]``
    (the response differs from the one drawn at θ), ``prompt_ids`` ``[B]``, and the base sums
    ``base_S``, ``base_S_tempered_full``, ``base_T`` ``[B, G]`` float64 from the rollout shard;
    and the cost: ``teacher_forced_tokens``, ``generated_tokens`` (decoded one by one),
    ``forward_tokens`` (sequence tokens run forward, as :mod:`entropy_probe.job_cost` counts them)
    and ``regeneration_tokens`` (what regenerating every response would decode: their lengths).
    """
    B, G, _ = rollout["sequences"].shape
    slots = [int(s) for s in slots]
    if len(slots) != B:
        raise ValueError(f"{len(slots)} slots for {B} prompt groups")
    prompt_ids, prompt_mask = rollouts.stored_prompts(rollout)
    if method not in METHODS:
        raise ValueError(f"fresh rollouts by {method!r}: expected one of {METHODS}")
    point = parameters.shifted(model, direction, eta)
    key = noise.NoiseKey(seed, stream)
    if method == "verification":
        verified = verify.fresh_responses(
            model, tokenizer, rollout, point, slots=slots, noise_key=key, temperature=temperature, top_p=top_p,
            max_new_tokens=max_new_tokens, stop_strings=stop_strings, tf_batch_size=tf_batch_size,
            chunk_tokens=chunk_tokens, gen_batch_size=gen_batch_size, autocast_dtype=autocast_dtype, kv_cache=kv_cache,
        )
        drawn, taught, generated = verified.responses, verified.teacher_forced_tokens, verified.generated_tokens
        forward = verified.forward_tokens
    else:
        drawn = parameters.call_at(model, point, lambda: generate.sample_groups(
            model, prompt_ids, prompt_mask, G, slots=slots, rows_per_call=gen_batch_size // G, temperature=temperature,
            top_p=top_p, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, noise_key=key, stop_strings=stop_strings,
            tokenizer=tokenizer, autocast_dtype=autocast_dtype, kv_cache=kv_cache,
        ))
        taught, generated = 0, int(drawn.response_lens.sum())
        forward = int(rollout["prompt_lens"].repeat_interleave(G).sum()) + generated
    width = drawn.response_tokens.shape[1]
    out = {
        "response_tokens": drawn.response_tokens.view(B, G, width),
        "response_lens": drawn.response_lens.view(B, G),
        "stop_reason": drawn.stop_reason.view(B, G),
        "token_log_q": drawn.token_log_q.view(B, G, width),
        "prompt_ids": rollout["prompt_ids"].clone(),
    }
    for values, kind in ((drawn.entropies, "sampler"), (drawn.tempered_entropies, "tempered_full")):
        out[entropies.get(kind).rollout_field] = values.view(B, G, width)
        out[entropies.get(kind).fresh_base_field] = rollouts.sampled_entropies(rollout, kind).double().sum(-1)
    out["changed"] = fresh.responses_changed(rollouts.stored_responses(rollout), rollout["response_lens"],
                                             out["response_tokens"], out["response_lens"])
    out["base_T"] = rollout["response_lens"].double()
    cost = {"teacher_forced_tokens": taught, "generated_tokens": generated, "forward_tokens": forward,
            "regeneration_tokens": int(drawn.response_lens.sum())}
    return out, cost




def verified_rollout_shard(model, tokenizer, previous: dict[str, Tensor], examples: list[dict], *, reward_fn,
                           slots, seed: int, temperature: float, top_p: float, max_new_tokens: int,
                           gen_batch_size: int, tf_batch_size: int, chunk_tokens: int | None = None,
                           stop_strings: list[str] | tuple[str, ...] = (), autocast_dtype=None,
                           kv_cache: str = "dynamic") -> tuple[dict[str, Tensor], dict[str, int]]:
    """An E rollout shard at the model's own parameters, from ``previous``, the shard of the same
    slots drawn with the same noise at other parameters (a trainer's previous checkpoint), by
    verification (:func:`verify.fresh_responses`): the shard :func:`rollout.rollout_shard` would
    draw, to float near-ties, with the same prompt layout; the sampling-time values of a verified
    response come from one teacher-forced pass. ``examples``: the prepared prompts (their gold
    answers score the responses). Returns the shard's tensors and the cost (as
    :func:`fresh_rollout_shard`)."""
    B, G, _ = previous["sequences"].shape
    slots = [int(s) for s in slots]
    if len(slots) != B:
        raise ValueError(f"{len(slots)} slots for {B} prompt groups")
    verified = verify.fresh_responses(
        model, tokenizer, previous, {}, slots=slots, noise_key=noise.NoiseKey(seed, noise.STREAM_E),
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
        tf_batch_size=tf_batch_size, chunk_tokens=chunk_tokens, gen_batch_size=gen_batch_size,
        autocast_dtype=autocast_dtype, kv_cache=kv_cache)
    prompt_ids = previous["prompt_ids"].tolist()
    prompt_tokens, prompt_mask = rollouts.stored_prompts(previous)
    chunk = rollouts.scored_chunk(tokenizer, verified.responses, examples, prompt_ids, G, reward_fn, prompt_tokens,
                                  prompt_mask)
    cost = {"teacher_forced_tokens": verified.teacher_forced_tokens, "generated_tokens": verified.generated_tokens,
            "forward_tokens": verified.forward_tokens,
            "regeneration_tokens": int(verified.responses.response_lens.sum())}
    return rollouts.assemble([chunk], prompt_ids, G, tokenizer.pad_token_id), cost
