"""The per-shard passes over stored rollouts: the X and Y gradients (reverse mode) and the
per-group directional derivatives along v (forward mode) that carry the error bars."""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm import tqdm

from . import estimators, losses, teacher_force

log = logging.getLogger(__name__)


def _group_view(x: Tensor, B: int, G: int) -> Tensor:
    return x.reshape(B, G, *x.shape[1:])


def x_weights(rollout: dict[str, Tensor], H_bar: float, normalization: str, baseline: str) -> Tensor:
    """Score-term weights w ``[B*G, T]`` from the RB entropies recorded at sampling time
    (equal to the teacher-forced ones to float tolerance, and detached either way)."""
    entropy = rollout["rb_entropies"].double()
    B, G, T = entropy.shape
    mask = (torch.arange(T)[None, None, :] < rollout["response_lens"][..., None])
    a, beta = estimators.score_weight_parts(entropy, mask, normalization, baseline)
    return (a - H_bar * beta).reshape(B * G, T)


def x_gradient(model, params, rollout, *, pad_token_id, temperature, top_p, H_bar, normalization,
               baseline, rb_requires_grad, tf_batch_size, chunk_tokens=None,
               autocast_dtype=None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """∇ Σ_{i∈shard} Σ_k [h_ik + w_ik log q_ik] (unnormalized, float64, keyed by parameter name)
    and per-sequence teacher-forced S_i and T_i.

    The surrogate is :func:`estimators.x_surrogate`'s, with per-token coefficients 1 on h_ik
    (0 without ``rb_requires_grad``) and w_ik on log q_ik, evaluated by
    :func:`teacher_force.surrogate`: ``tf_batch_size`` sequences per forward pass, the output
    embedding ``chunk_tokens`` response tokens at a time (memory: one ``[chunk, V]`` fp32 block).
    ``autocast_dtype`` ("bfloat16" or a torch dtype; None/"float32" = fp32) runs the forward under
    autocast (DESIGN §2 "Precision": only where the user asks)."""
    batch = teacher_force.from_rollout(rollout, pad_token_id)
    weights = x_weights(rollout, H_bar, normalization, baseline)
    scorer = teacher_force.ResponseLogits(model)
    n = batch.input_ids.shape[0]
    S = torch.zeros(n, dtype=torch.float64)
    dtype = teacher_force.autocast_dtype(autocast_dtype)

    def surrogate(rows):
        sub = batch.select(rows)
        valid = sub.response_mask.float()
        w = weights[rows, : sub.response_tokens.shape[1]].float() * valid
        value, scores = teacher_force.surrogate(
            scorer, sub, temperature, top_p, coef_entropy=valid if rb_requires_grad else None, coef_log_q=w,
            chunk_tokens=chunk_tokens, autocast_dtype=dtype,
        )
        S[rows] = scores.entropy.double().sum(-1).cpu()
        return value

    batches = teacher_force.length_sorted_batches(batch, tf_batch_size)
    grads = teacher_force.accumulate_gradient(params, surrogate, tqdm(batches, desc="X teacher forcing", unit="batch"))
    return grads, {"S": S, "T": batch.response_lens.double()}


def y_gradient(model, params, rollout, *, pad_token_id, temperature, normalization,
               tf_batch_size, chunk_tokens=None, autocast_dtype=None,
               loss_settings: dict | None = None) -> tuple[dict[str, Tensor], float]:
    """∇ Σ_{i∈shard} w_i Σ_k log softmax(z_ik/τ)(y_ik) (unnormalized, float64) and this shard's
    share Z(shard) of the normalizer: Y = Σ_shards ∇ / Σ_shards Z (:func:`losses.shard_terms`;
    ``normalization`` is a loss type of :data:`losses.LOSS_TYPES`, ``loss_settings`` its
    ``max_completion_length`` / ``loss_scale_factor``). Batching, chunking and autocast as in
    :func:`x_gradient`."""
    batch = teacher_force.from_rollout(rollout, pad_token_id)
    coef, share = losses.shard_terms(normalization, rollout["advantages"], rollout["response_lens"],
                                     **(loss_settings or {}))
    coef = coef.reshape(-1)
    scorer = teacher_force.ResponseLogits(model)
    dtype = teacher_force.autocast_dtype(autocast_dtype)

    def surrogate(rows):
        sub = batch.select(rows)
        c = coef[rows].float()[:, None] * sub.response_mask.float()
        value, _ = teacher_force.surrogate(scorer, sub, temperature, 1.0, coef_tempered=c,
                                           chunk_tokens=chunk_tokens, autocast_dtype=dtype)
        return value

    batches = teacher_force.length_sorted_batches(batch, tf_batch_size)
    grads = teacher_force.accumulate_gradient(params, surrogate, tqdm(batches, desc="Y teacher forcing", unit="batch"))
    return grads, share


def directional_sums(model, direction: dict[str, Tensor], rollout, *, pad_token_id, temperature, top_p,
                     normalization, baseline, rb_requires_grad, tf_batch_size,
                     chunk_tokens=None) -> dict[str, Tensor]:
    """Per-prompt-group sums for :func:`estimators.directional_estimate` along ``direction``
    (forward-mode AD: one JVP pass, eager attention since SDPA kernels lack forward AD; the
    output embedding ``chunk_tokens`` response tokens at a time): P_g, Q_g, S_g, T_g, each
    ``[B]`` float64."""
    batch = teacher_force.from_rollout(rollout, pad_token_id)
    B, G, T = rollout["rb_entropies"].shape
    entropy = rollout["rb_entropies"].double()
    mask = torch.arange(T)[None, None, :] < rollout["response_lens"][..., None]
    a, beta = (x.reshape(B * G, T) for x in estimators.score_weight_parts(entropy, mask, normalization, baseline))
    scorer = teacher_force.ResponseLogits(model)
    named = dict(model.named_parameters())
    unknown = sorted(set(direction) - set(named))
    if unknown:
        raise KeyError(f"direction has parameters the policy lacks: {unknown[:3]}")
    primals = {f"policy.{k}": named[k].detach() for k in direction}
    tangents = {f"policy.{k}": direction[k].to(named[k].device, named[k].dtype) for k in direction}
    per_seq = {name: torch.zeros(B * G, dtype=torch.float64) for name in ("P", "Q", "S")}
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        for rows in tqdm(teacher_force.length_sorted_batches(batch, tf_batch_size), desc="directional", unit="batch"):
            sub = batch.select(rows)

            def fn(p):
                s = teacher_force.score(scorer, sub, temperature, top_p, params=p, chunk_tokens=chunk_tokens)
                return s.entropy, s.token_log_q

            with torch.no_grad():
                (h, _), (dh, dlq) = torch.func.jvp(fn, (primals,), (tangents,))
            width = sub.response_tokens.shape[1]
            dh, dlq = dh.double().cpu(), dlq.double().cpu()
            pathwise = dh.sum(-1) if rb_requires_grad else torch.zeros(len(rows), dtype=torch.float64)
            per_seq["P"][rows] = pathwise + (a[rows, :width] * dlq).sum(-1)
            per_seq["Q"][rows] = (beta[rows, :width] * dlq).sum(-1)
            per_seq["S"][rows] = h.double().sum(-1).cpu()
    finally:
        model.set_attn_implementation(previous)
    sums = {name: x.reshape(B, G).sum(-1) for name, x in per_seq.items()}
    sums["T"] = batch.response_lens.double().reshape(B, G).sum(-1)
    return sums
