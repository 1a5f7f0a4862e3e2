"""Fresh rollouts by verification (DESIGN §2b "coupled fresh rollouts"): the same sample as
redrawing every E slot token by token at θ' = θ + ηv, at the cost of one teacher-forced pass over
the E batch plus the parts that change.

A slot's fresh response is the Gumbel-max draw y'_k = argmax_v [log q'_k(v) + g_k(v)] under θ''s
own sampler, its noise g keyed by (slot, response, position k, token). As long as y' agrees with
the response y drawn at θ, the prefix it conditions on is y's, so θ''s draws along y come out of
one teacher-forced pass of y at θ' (speculative decoding with y as the draft): at the first
position d where the draw differs, y' = y[:d] + ŷ'_d, and only from there on is it generated, with
the same position-keyed noise. Where no position differs the fresh response is y itself (a
response ends by its own tokens: EOS, a stop string, or max_new_tokens), with its sampling-time
entropies from the same pass. Float rounding of the logits differs between the teacher-forced and
the incremental pass, so a near-tie of two perturbed scores could go either way (as between two
batch layouts of full regeneration).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import generate, measure, noise, parameters, precision, rollout as rollouts, teacher_force, tf_layout
from .stopping import STOP_EOS, STOP_MAX_TOKENS, STOP_STRING, completes_stop_string


@dataclass
class Draws:
    """θ''s own draws along stored responses, ``[N, T]`` (0 / the stored token past each end)."""

    tokens: Tensor  # long: argmax_v [log q'_k(v) + g_k(v)] at each teacher-forced position
    token_log_q: Tensor  # fp32: log q'_k of that draw
    entropies: Tensor  # fp32: the RB entropy of q'_k
    tempered_entropies: Tensor  # fp32: the full-vocabulary tempered entropy at position k
    first_divergence: Tensor  # [N] long: the first k where the draw differs from y_k; T_i where none


def draws_along(model, params: dict[str, Tensor], batch: tf_layout.TokenBatch, state: tuple[Tensor, Tensor], *,
                temperature: float, top_p: float, tf_batch_size: int, chunk_tokens: int | None = None,
                autocast_dtype=None) -> Draws:
    """Teacher-force the stored responses of ``batch`` (``N`` rows) at ``params`` and draw, at every
    response position k, θ''s own Gumbel-max token given y[:k]. ``state``: each row's noise state
    after its slot and response (:func:`noise.slot_state`, ``[N]`` each). The decoder runs once per
    ``tf_batch_size`` rows; the output embedding and the noise ``chunk_tokens`` positions at a time."""
    scorer = teacher_force.ResponseLogits(model)
    device = next(model.parameters()).device
    dtype = precision.autocast_dtype(autocast_dtype)
    n, width = batch.response_tokens.shape
    tokens = batch.response_tokens.clone()
    values = {name: torch.zeros(n, width, dtype=torch.float32) for name in ("lq", "rb", "full")}
    buffers: dict = {}
    with torch.no_grad():
        for batch_rows in tf_layout.length_sorted_batches(batch, tf_batch_size):
            sub = batch.select(batch_rows)
            rows, cols, _ = tf_layout.valid_pairs(sub, device)
            hidden, head = teacher_force.response_hidden_and_head(scorer, sub, rows, cols, params, dtype)
            global_rows = batch_rows.to(device)[rows]
            start = 0
            for size in tf_layout.chunk_sizes(len(rows), chunk_tokens):
                sl = slice(start, start + size)
                start += size
                logits = head(hidden[sl])
                mask = measure.nucleus_mask(logits, temperature, top_p)
                lq = measure.log_q(logits, mask, temperature)
                r, k = global_rows[sl], cols[sl]
                at = noise.at_position((state[0].to(device)[r], state[1].to(device)[r]), k)
                drawn = generate.perturbed_log_q(lq, mask, at, top_p, buffers).argmax(-1)
                rb = measure.rb_entropy(lq, mask)
                full = rb if top_p >= 1.0 else measure.full_entropy(logits, temperature)
                r, k = r.cpu(), k.cpu()
                tokens[r, k] = drawn.cpu()
                values["lq"][r, k] = lq.gather(-1, drawn[:, None]).squeeze(-1).float().cpu()
                values["rb"][r, k] = rb.float().cpu()
                values["full"][r, k] = full.float().cpu()
                del logits, lq, mask
    lens = batch.response_lens
    differs = (tokens != batch.response_tokens) & batch.response_mask
    first = torch.where(differs.any(-1), differs.int().argmax(-1), lens)
    return Draws(tokens, values["lq"], values["rb"], values["full"], first)


@dataclass
class Verified:
    """Fresh responses of ``N`` slots, right-padded to the longest (0 / the pad id past each end)."""

    responses: generate.Rollouts
    teacher_forced_tokens: int  # response tokens scored by the verification pass
    generated_tokens: int  # tokens decoded one by one after a divergence
    forward_tokens: int  # sequence tokens run forward: every stored sequence once, then each continued one
    diverged: Tensor  # [N] bool: θ''s draw left the stored response somewhere


def fresh_responses(model, tokenizer, rollout: dict[str, Tensor], params: dict[str, Tensor], *, slots,
                    noise_key: noise.NoiseKey, temperature: float, top_p: float, max_new_tokens: int,
                    stop_strings=(), tf_batch_size: int, chunk_tokens: int | None = None, gen_batch_size: int,
                    autocast_dtype=None, kv_cache: str = "dynamic") -> Verified:
    """Every response slot of a rollout shard (``B`` prompt groups × ``G``, slots ``[B]`` in the
    whole batch) redrawn at ``params`` with the noise it was drawn with, by verification: the same
    responses, lengths, stop reasons and sampling-time values as :func:`generate.sample_groups` at
    ``params`` (to float near-ties), rows prompt-major (b*G + g)."""
    B, G, _ = rollout["sequences"].shape
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    batch = tf_layout.from_rollout(rollout, pad)
    row_slots = torch.as_tensor([int(s) for s in slots], dtype=torch.int64).repeat_interleave(G)
    row_responses = torch.arange(G, dtype=torch.int64).repeat(B)
    state = noise.slot_state(noise_key, row_slots, row_responses)
    draws = draws_along(model, params, batch, state, temperature=temperature, top_p=top_p,
                        tf_batch_size=tf_batch_size, chunk_tokens=chunk_tokens, autocast_dtype=autocast_dtype)
    lens, d = batch.response_lens, draws.first_divergence
    diverged = d < lens
    # the verified part: y[:d] and θ''s draw at d (the whole of y where nothing differs); a
    # diverged response ends there at an EOS, a completed stop string or max_new_tokens
    verified_lens = torch.where(diverged, d + 1, lens)
    reason = rollout["stop_reason"].reshape(-1).clone()
    last = draws.tokens.gather(1, d.clamp(max=draws.tokens.shape[1] - 1)[:, None]).squeeze(-1)
    at_eos = diverged & (last == eos)
    reason[at_eos] = STOP_EOS
    open_rows = diverged & ~at_eos
    if stop_strings and bool(open_rows.any()):
        rows = open_rows.nonzero().squeeze(-1)
        texts = [t[:n] for t, n in zip(draws.tokens[rows].tolist(), verified_lens[rows].tolist())]
        found = torch.tensor(completes_stop_string(tokenizer, list(stop_strings), texts))
        reason[rows[found]] = STOP_STRING
        open_rows[rows[found]] = False
    at_limit = open_rows & (verified_lens >= max_new_tokens)
    reason[at_limit] = STOP_MAX_TOKENS
    continued = (open_rows & ~at_limit).nonzero().squeeze(-1)
    suffix = _continue(model, params, rollout, draws.tokens[continued], verified_lens[continued],
                       row_slots[continued], row_responses[continued], prompt_rows=continued // G,
                       noise_key=noise_key, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                       eos=eos, pad=pad, stop_strings=stop_strings, tokenizer=tokenizer,
                       gen_batch_size=gen_batch_size, autocast_dtype=autocast_dtype, kv_cache=kv_cache)
    final_lens = verified_lens.clone()
    if suffix is not None:
        final_lens[continued] += suffix.response_lens
        reason[continued] = suffix.stop_reason
    width = int(final_lens.max())
    columns = torch.arange(width)[None, :]
    in_verified = columns < verified_lens[:, None]

    def assemble(verified: Tensor, generated: Tensor | None, fill) -> Tensor:
        out = torch.full((len(lens), width), fill, dtype=verified.dtype)
        span = min(width, verified.shape[1])
        out[:, :span] = torch.where(in_verified[:, :span], verified[:, :span], torch.as_tensor(fill, dtype=verified.dtype))
        if generated is not None and len(continued):
            k = verified_lens[continued][:, None] + torch.arange(generated.shape[1])[None, :]
            keep = torch.arange(generated.shape[1])[None, :] < suffix.response_lens[:, None]
            rows = continued[:, None].expand_as(k)
            out[rows[keep], k[keep]] = generated[keep].to(out.dtype)
        return out

    pick = (lambda name: getattr(suffix, name)) if suffix is not None else (lambda name: None)
    responses = generate.Rollouts(
        response_tokens=assemble(draws.tokens, pick("response_tokens"), pad),
        response_lens=final_lens,
        stopped_at_eos=reason == STOP_EOS,
        stop_reason=reason.to(torch.int8),
        token_log_q=assemble(draws.token_log_q, pick("token_log_q"), 0.0),
        entropies=assemble(draws.entropies, pick("entropies"), 0.0),
        tempered_entropies=assemble(draws.tempered_entropies, pick("tempered_entropies"), 0.0),
    )
    generated = 0 if suffix is None else int(suffix.response_lens.sum())
    prompt_lens = rollout["prompt_lens"].repeat_interleave(G)
    forward = int(rollout["attention_masks"].sum()) + int((prompt_lens[continued] + final_lens[continued]).sum())
    return Verified(responses, int(lens.sum()), generated, forward, diverged)


def _continue(model, params, rollout, prefix_tokens: Tensor, prefix_lens: Tensor, row_slots: Tensor,
              row_responses: Tensor, *, prompt_rows: Tensor, eos: int, pad: int, gen_batch_size: int,
              **decoding) -> generate.Rollouts | None:
    """The diverged rows generated on from their prefixes (``prefix_tokens[i, :prefix_lens[i]]``
    after prompt ``prompt_rows[i]`` of the shard), ``gen_batch_size`` rows per call: their new
    tokens only, in the given order (None when there is no row)."""
    if not len(prefix_lens):
        return None
    prompt_ids, prompt_mask = rollouts.stored_prompts(rollout)
    parts = []
    for lo in range(0, len(prefix_lens), max(1, gen_batch_size)):
        sl = slice(lo, lo + max(1, gen_batch_size))
        width = int(prefix_lens[sl].max())
        ids, mask = _left_padded(prompt_ids[prompt_rows[sl]], prompt_mask[prompt_rows[sl]],
                                 prefix_tokens[sl, :width], prefix_lens[sl], pad)
        parts.append(parameters.call_at(model, params, lambda: generate.decode(
            model, ids, mask, row_slots=row_slots[sl], row_responses=row_responses[sl], eos_token_id=eos,
            pad_token_id=pad, prefix_lens=prefix_lens[sl], prefix_tokens=prefix_tokens[sl, :width], **decoding)))
    return generate.concatenate(parts, pad)


def _left_padded(prompt_ids: Tensor, prompt_mask: Tensor, prefix_tokens: Tensor, prefix_lens: Tensor,
                 pad: int) -> tuple[Tensor, Tensor]:
    """Left-padded prompts ``[n, P]``, each followed by its response prefix (``[n, D]``, its first
    ``prefix_lens`` tokens), left-padded again to the longest: ``[n, W]`` ids and mask, the
    leading all-pad columns cropped."""
    D = prefix_tokens.shape[1]
    tail_mask = (torch.arange(D)[None, :] < prefix_lens[:, None]).to(prompt_mask.dtype)
    tails = torch.where(tail_mask.bool(), prefix_tokens.to(prompt_ids.dtype), pad)
    ids, mask = torch.cat([prompt_ids, tails], 1), torch.cat([prompt_mask, tail_mask], 1)
    index = torch.arange(ids.shape[1])[None, :] - (D - prefix_lens)[:, None]  # content to the right edge
    inside = index >= 0
    ids = torch.where(inside, ids.gather(1, index.clamp(min=0)), pad)
    return generate.crop_left(ids, torch.where(inside, mask.gather(1, index.clamp(min=0)), 0))
