"""The fresh-rollout pass over one E shard (DESIGN §2b "coupled fresh rollouts"): every response
slot redrawn at θ' = θ + ηv with the noise it was drawn with at θ, under θ''s own sampler (its own
nucleus), recording both per-prefix entropies at sampling time and which responses changed. The
paired statistics over the whole E batch are :mod:`entropy_probe.fresh`.
"""
from __future__ import annotations

from torch import Tensor

from . import entropies, fresh, generate, noise, parameters, rollout as rollouts


def fresh_rollout_shard(
    model, tokenizer, rollout: dict[str, Tensor], direction: dict[str, Tensor], eta: float, *, slots, seed: int,
    temperature: float, top_p: float, max_new_tokens: int, gen_batch_size: int,
    stop_strings: list[str] | tuple[str, ...] = (), stream: int = noise.STREAM_E, autocast_dtype=None,
    kv_cache: str = "dynamic",
) -> dict[str, Tensor]:
    """Redraw every response slot of an E rollout shard at θ' = θ + η·direction with the same noise.

    ``rollout``: the E shard (its prompts, responses and sampling-time entropies at θ); ``slots``
    ``[B]``: each prompt's slot in the whole E batch (:func:`entropy_probe.plan.shard_slots`), so
    response g of slot b gets the noise of key (``seed``, ``stream``, b, g, k, v) exactly as it did
    at θ. Sampling is :func:`generate.sample` under θ''s own sampler (nucleus from θ''s logits),
    with the parameters applied by :func:`parameters.call_at` (the model is never written);
    ``gen_batch_size`` sequences per call (:func:`generate.sample_groups`; execution only). ``autocast_dtype`` (``model.precision``)
    and ``kv_cache`` as in :func:`generate.sample`: the precision of the rollouts at θ.

    Returns (B prompts, G responses, T' the fresh width): ``response_tokens`` ``[B, G, T']``,
    ``response_lens`` and ``stop_reason`` ``[B, G]``, ``token_log_q``, ``rb_entropies`` and
    ``tempered_entropies`` ``[B, G, T']`` (sampling time, 0 past the end), ``changed`` ``[B, G]``
    (the response differs from the one drawn at θ), ``prompt_ids`` ``[B]``, and the base sums
    ``base_S``, ``base_S_tempered_full``, ``base_T`` ``[B, G]`` float64 from the rollout shard.
    """
    B, G, _ = rollout["sequences"].shape
    slots = [int(s) for s in slots]
    if len(slots) != B:
        raise ValueError(f"{len(slots)} slots for {B} prompt groups")
    prompt_ids, prompt_mask = rollouts.stored_prompts(rollout)
    point = parameters.shifted(model, direction, eta)
    drawn = parameters.call_at(model, point, lambda: generate.sample_groups(
        model, prompt_ids, prompt_mask, G, slots=slots, rows_per_call=gen_batch_size // G, temperature=temperature,
        top_p=top_p, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, noise_key=noise.NoiseKey(seed, stream), stop_strings=stop_strings,
        tokenizer=tokenizer, autocast_dtype=autocast_dtype, kv_cache=kv_cache,
    ))
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
    return out


