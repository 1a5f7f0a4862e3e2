"""The per-shard passes over stored rollouts: the X and Y gradients (reverse mode) and the
per-group directional derivatives along v (forward mode) that carry the error bars."""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm import tqdm

from . import estimators, precision, rollout as rollouts, teacher_force, tf_layout

log = logging.getLogger(__name__)


def x_gradient(model, params, rollout, *, pad_token_id, temperature, top_p, H_bar, normalization,
               baseline, rb_requires_grad, tf_batch_size, chunk_tokens=None,
               autocast_dtype=None, entropy="sampler") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """∇ Σ_{i∈shard} Σ_k [c^h_ik h_ik + c^q_ik log q_ik] with the coefficients of
    :func:`estimators.x_coefficients` (unnormalized, float64, keyed by parameter name) and the
    per-sequence teacher-forced S_i and T_i. h is the per-prefix entropy ``entropy``
    (``estimator.entropy``, :data:`measure.ENTROPIES`): its sampling-time values weight the score
    term (entropy-to-go), its teacher-forced values and closed-form gradient give S and the
    pathwise term.

    Evaluated by :func:`teacher_force.surrogate`: ``tf_batch_size`` sequences per forward pass,
    the output embedding ``chunk_tokens`` response tokens at a time (memory: one ``[chunk, V]``
    fp32 block). ``autocast_dtype`` ("bfloat16" or a torch dtype; None/"float32" = fp32) runs the
    forward under autocast (DESIGN §2 "Precision": only where the user asks)."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    coefs = estimators.x_coefficients(rollouts.sampled_entropies(rollout, entropy), rollout["response_lens"], H_bar,
                                      normalization, baseline, rb_requires_grad)
    scorer = teacher_force.ResponseLogits(model)
    n = batch.input_ids.shape[0]
    S = torch.zeros(n, dtype=torch.float64)
    dtype = precision.autocast_dtype(autocast_dtype)

    def surrogate(rows):
        sub = batch.select(rows)
        width = sub.response_tokens.shape[1]
        valid = sub.response_mask.float()
        c_h = None if coefs.entropy is None else coefs.entropy[rows, :width].float()
        c_q = coefs.log_q[rows, :width].float() * valid
        value, scores = teacher_force.surrogate(
            scorer, sub, temperature, top_p, coef_entropy=c_h, coef_log_q=c_q,
            chunk_tokens=chunk_tokens, autocast_dtype=dtype, entropy=entropy,
        )
        S[rows] = scores.entropy.double().sum(-1).cpu()
        return value

    batches = tf_layout.length_sorted_batches(batch, tf_batch_size)
    grads = teacher_force.accumulate_gradient(params, surrogate, tqdm(batches, desc="X teacher forcing", unit="batch"))
    return grads, {"S": S, "T": batch.response_lens.double()}


def y_gradient(model, params, rollout, coefficients: Tensor, *, pad_token_id, temperature,
               tf_batch_size, chunk_tokens=None, autocast_dtype=None) -> dict[str, Tensor]:
    """∇ Σ_{i∈shard} a_i Σ_k log softmax(z_ik/τ)(y_ik) (unnormalized, float64) for per-response
    numerators ``coefficients`` ``[B, G]`` (:func:`losses.response_weights`; the reduction
    divides by the loss's normalizer). Batching, chunking and autocast as in :func:`x_gradient`."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    coef = coefficients.reshape(-1)
    scorer = teacher_force.ResponseLogits(model)
    dtype = precision.autocast_dtype(autocast_dtype)

    def surrogate(rows):
        sub = batch.select(rows)
        c = coef[rows].float()[:, None] * sub.response_mask.float()
        value, _ = teacher_force.surrogate(scorer, sub, temperature, 1.0, coef_tempered=c,
                                           chunk_tokens=chunk_tokens, autocast_dtype=dtype)
        return value

    batches = tf_layout.length_sorted_batches(batch, tf_batch_size)
    return teacher_force.accumulate_gradient(params, surrogate, tqdm(batches, desc="Y teacher forcing", unit="batch"))


def directional_sums(model, direction: dict[str, Tensor], rollout, *, pad_token_id, temperature, top_p,
                     normalization, baseline, rb_requires_grad, tf_batch_size,
                     chunk_tokens=None, entropy="sampler") -> dict[str, Tensor]:
    """Per-prompt-group sums for :func:`estimators.directional_estimate` along ``direction``
    (forward-mode AD: one JVP pass, eager attention since SDPA kernels lack forward AD; the
    output embedding ``chunk_tokens`` response tokens at a time): P_g, Q_g, S_g, T_g, each
    ``[B]`` float64. h is the per-prefix entropy ``entropy``, as in :func:`x_gradient`."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    sampled = rollouts.sampled_entropies(rollout, entropy).double()
    B, G, T = sampled.shape
    mask = estimators.response_mask(rollout["response_lens"], T)
    a, beta = (x.reshape(B * G, T) for x in estimators.score_weight_parts(sampled, mask, normalization, baseline))
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
        for rows in tqdm(tf_layout.length_sorted_batches(batch, tf_batch_size), desc="directional", unit="batch"):
            sub = batch.select(rows)

            def fn(p):
                s = teacher_force.score(scorer, sub, temperature, top_p, params=p, chunk_tokens=chunk_tokens,
                                        entropy=entropy)
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
