"""The per-shard passes over stored rollouts: the X and Y gradients (reverse mode) and the
per-group directional derivatives along v (forward mode) that carry the error bars."""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm import tqdm

from . import attention, checkpointing, estimators, precision, teacher_force, tf_layout

log = logging.getLogger(__name__)


def x_gradient(model, params, rollout, *, pad_token_id, temperature, top_p, H_bar, normalization,
               baseline, rb_requires_grad, tf_batch_size, chunk_tokens=None,
               autocast_dtype=None, gradient_checkpointing=False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """∇ Σ_{i∈shard} Σ_k [c^h_ik h_ik + c^q_ik log q_ik] with the coefficients of
    :func:`estimators.x_coefficients` (unnormalized, float64, keyed by parameter name) and the
    per-sequence teacher-forced S_i and T_i.

    Evaluated by :func:`teacher_force.surrogate`: ``tf_batch_size`` sequences per forward pass,
    the output embedding ``chunk_tokens`` response tokens at a time (memory: one ``[chunk, V]``
    fp32 block). Per-sequence stats: S_i, T_i and ``outside_nucleus`` (tokens kept outside their
    recomputed nucleus, bf16 only: :func:`precision.keeps_sampled_tokens`). ``autocast_dtype``
    (``model.precision``: "bfloat16" or a torch dtype; None/"float32" = fp32) runs the forward
    under autocast (DESIGN §2 "Precision": only where the user asks). With
    ``gradient_checkpointing`` the decoder layers recompute their activations in the backward
    (:mod:`entropy_probe.checkpointing`; the same gradients, less memory for long responses)."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    coefs = estimators.x_coefficients(rollout["rb_entropies"], rollout["response_lens"], H_bar, normalization,
                                      baseline, rb_requires_grad)
    scorer = teacher_force.ResponseLogits(model)
    n = batch.input_ids.shape[0]
    S = torch.zeros(n, dtype=torch.float64)
    outside = torch.zeros(n, dtype=torch.float64)
    dtype = precision.autocast_dtype(autocast_dtype)
    keep = precision.keeps_sampled_tokens(dtype)

    def surrogate(rows):
        sub = batch.select(rows)
        width = sub.response_tokens.shape[1]
        valid = sub.response_mask.float()
        c_h = None if coefs.entropy is None else coefs.entropy[rows, :width].float()
        c_q = coefs.log_q[rows, :width].float() * valid
        value, scores = teacher_force.surrogate(
            scorer, sub, temperature, top_p, coef_entropy=c_h, coef_log_q=c_q,
            chunk_tokens=chunk_tokens, autocast_dtype=dtype, keep_tokens=keep,
        )
        S[rows] = scores.entropy.double().sum(-1).cpu()
        outside[rows] = scores.outside_nucleus.double()
        return value

    batches = tf_layout.length_sorted_batches(batch, tf_batch_size)
    with checkpointing.checkpointed_layers(model, gradient_checkpointing):
        grads = teacher_force.accumulate_gradient(params, surrogate,
                                                  tqdm(batches, desc="X teacher forcing", unit="batch"))
    _log_outside(outside, "X pass")
    return grads, {"S": S, "T": batch.response_lens.double(), "outside_nucleus": outside}


def _log_outside(outside: Tensor, what: str) -> None:
    total = int(outside.sum())
    if total:
        log.warning("%s: %d sampled tokens (in %d sequences) lie outside the nucleus recomputed in this precision: "
                    "kept, at the q of S ∪ {y} (entropy_probe.precision.keeps_sampled_tokens)", what, total,
                    int((outside > 0).sum()))


def y_gradient(model, params, rollout, coefficients: Tensor, *, pad_token_id, temperature,
               tf_batch_size, chunk_tokens=None, autocast_dtype=None,
               gradient_checkpointing=False) -> dict[str, Tensor]:
    """∇ Σ_{i∈shard} a_i Σ_k log softmax(z_ik/τ)(y_ik) (unnormalized, float64) for per-response
    numerators ``coefficients`` ``[B, G]`` (:func:`losses.response_weights`; the reduction
    divides by the loss's normalizer). Batching, chunking, autocast and checkpointing as in
    :func:`x_gradient`."""
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
    with checkpointing.checkpointed_layers(model, gradient_checkpointing):
        return teacher_force.accumulate_gradient(params, surrogate,
                                                 tqdm(batches, desc="Y teacher forcing", unit="batch"))


def directional_sums(model, direction: dict[str, Tensor], rollout, *, pad_token_id, temperature, top_p,
                     normalization, baseline, rb_requires_grad, tf_batch_size,
                     chunk_tokens=None, autocast_dtype=None) -> dict[str, Tensor]:
    """Per-prompt-group sums for :func:`estimators.directional_estimate` along ``direction``
    (forward-mode AD: one JVP pass, the attention of :mod:`entropy_probe.attention` since SDPA
    kernels lack forward AD; the output embedding ``chunk_tokens`` response tokens at a time): P_g, Q_g, S_g, T_g, each
    ``[B]`` float64, and ``outside_nucleus`` ``[B]`` (as in :func:`x_gradient`). ``autocast_dtype``
    as in :func:`x_gradient` (primal and tangent matrix products both in that precision; the
    measure on fp32 logits)."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    B, G, T = rollout["rb_entropies"].shape
    entropy = rollout["rb_entropies"].double()
    mask = estimators.response_mask(rollout["response_lens"], T)
    a, beta = (x.reshape(B * G, T) for x in estimators.score_weight_parts(entropy, mask, normalization, baseline))
    scorer = teacher_force.ResponseLogits(model)
    named = dict(model.named_parameters())
    unknown = sorted(set(direction) - set(named))
    if unknown:
        raise KeyError(f"direction has parameters the policy lacks: {unknown[:3]}")
    primals = {f"policy.{k}": named[k].detach() for k in direction}
    tangents = {f"policy.{k}": direction[k].to(named[k].device, named[k].dtype) for k in direction}
    per_seq = {name: torch.zeros(B * G, dtype=torch.float64) for name in ("P", "Q", "S", "outside_nucleus")}
    dtype = precision.autocast_dtype(autocast_dtype)
    keep = precision.keeps_sampled_tokens(dtype)
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.register())
    try:
        for rows in tqdm(tf_layout.length_sorted_batches(batch, tf_batch_size), desc="directional", unit="batch"):
            sub = batch.select(rows)

            def fn(p):
                s = teacher_force.score(scorer, sub, temperature, top_p, params=p, chunk_tokens=chunk_tokens,
                                        autocast_dtype=dtype, keep_tokens=keep)
                return s.entropy, s.token_log_q, s.outside_nucleus.double()

            with torch.no_grad():
                (h, _, outside), (dh, dlq, _) = torch.func.jvp(fn, (primals,), (tangents,))
            per_seq["outside_nucleus"][rows] = outside
            width = sub.response_tokens.shape[1]
            dh, dlq = dh.double().cpu(), dlq.double().cpu()
            pathwise = dh.sum(-1) if rb_requires_grad else torch.zeros(len(rows), dtype=torch.float64)
            per_seq["P"][rows] = pathwise + (a[rows, :width] * dlq).sum(-1)
            per_seq["Q"][rows] = (beta[rows, :width] * dlq).sum(-1)
            per_seq["S"][rows] = h.double().sum(-1).cpu()
    finally:
        model.set_attn_implementation(previous)
    _log_outside(per_seq["outside_nucleus"], "directional pass")
    sums = {name: x.reshape(B, G).sum(-1) for name, x in per_seq.items()}
    sums["T"] = batch.response_lens.double().reshape(B, G).sum(-1)
    return sums
