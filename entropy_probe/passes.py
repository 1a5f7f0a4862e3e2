"""The per-shard passes over stored rollouts: the X and Y gradients (reverse mode), the per-token
directional derivatives along v on the E batch (forward mode: the error bars and the attribution
of δH₁) and along J·X on the U batch (the attribution of v). The SNIS pass and the fresh
rollouts are :mod:`entropy_probe.snis_pass` and :mod:`entropy_probe.fresh_pass`."""
from __future__ import annotations

import logging

import torch
from torch import Tensor
from tqdm import tqdm

from . import activation_checkpointing, attention, estimators, precision, rollout as rollouts, teacher_force, tf_layout

log = logging.getLogger(__name__)

TOKEN_PREFIX = "token/"  # per-token tensors stored beside a directional shard's per-group sums


def x_gradient(model, params, rollout, *, pad_token_id, temperature, top_p, H_bar, normalization,
               baseline, pathwise_term, tf_batch_size, chunk_tokens=None,
               autocast_dtype=None, gradient_checkpointing=False,
               entropy="sampler") -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """∇ Σ_{i∈shard} Σ_k [c^h_ik h_ik + c^q_ik log q_ik] with the coefficients of
    :func:`estimators.x_coefficients` (unnormalized, float64, keyed by parameter name) and the
    per-sequence teacher-forced S_i and T_i. h is the per-prefix entropy ``entropy``
    (``estimator.entropy``, :data:`entropies.ENTROPY_KINDS`): its sampling-time values weight the score
    term (entropy-to-go), its teacher-forced values and closed-form gradient give S and the
    pathwise term.

    Evaluated by :func:`teacher_force.surrogate`: ``tf_batch_size`` sequences per forward pass,
    the output embedding ``chunk_tokens`` response tokens at a time (memory: one ``[chunk, V]``
    fp32 block). Per-sequence stats: S_i, T_i and ``outside_nucleus`` (tokens kept outside their
    recomputed nucleus, bf16 only: :func:`precision.keeps_sampled_tokens`). ``autocast_dtype``
    (``model.precision``: "bfloat16" or a torch dtype; None/"float32" = fp32) runs the forward
    under autocast (DESIGN §2 "Precision": only where the user asks). With
    ``gradient_checkpointing`` the decoder layers recompute their activations in the backward
    (:mod:`entropy_probe.activation_checkpointing`; the same gradients, less memory for long responses)."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    coefs = estimators.x_coefficients(rollouts.sampled_entropies(rollout, entropy), rollout["response_lens"], H_bar,
                                      normalization, baseline, pathwise_term)
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
            chunk_tokens=chunk_tokens, autocast_dtype=dtype, keep_tokens=keep, entropy=entropy,
        )
        S[rows] = scores.entropy.double().sum(-1).cpu()
        outside[rows] = scores.outside_nucleus.double()
        return value

    batches = tf_layout.length_sorted_batches(batch, tf_batch_size)
    with activation_checkpointing.checkpointed_layers(model, gradient_checkpointing):
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
    with activation_checkpointing.checkpointed_layers(model, gradient_checkpointing):
        return teacher_force.accumulate_gradient(params, surrogate,
                                                 tqdm(batches, desc="Y teacher forcing", unit="batch"))


def _jvp_batches(model, direction: dict[str, Tensor], batch, tf_batch_size: int, fn, desc: str):
    """For each length-sorted batch of ``tf_batch_size`` rows: (rows, sub-batch, primal outputs,
    tangent outputs) of ``fn(sub, params)`` by forward-mode AD along ``direction`` (one JVP pass;
    the attention of :mod:`entropy_probe.attention`, since SDPA kernels lack forward AD)."""
    named = dict(model.named_parameters())
    unknown = sorted(set(direction) - set(named))
    if unknown:
        raise KeyError(f"direction has parameters the policy lacks: {unknown[:3]}")
    primals = {k: named[k].detach() for k in direction}
    tangents = {k: direction[k].to(named[k].device, named[k].dtype) for k in direction}
    previous = model.config._attn_implementation
    model.set_attn_implementation(attention.register())
    try:
        for rows in tqdm(tf_layout.length_sorted_batches(batch, tf_batch_size), desc=desc, unit="batch"):
            sub = batch.select(rows)
            with torch.no_grad():
                out, tangent = torch.func.jvp(lambda p: fn(sub, p), (primals,), (tangents,))
            yield rows, sub, out, tangent
    finally:
        model.set_attn_implementation(previous)


def directional_tokens(model, direction: dict[str, Tensor], rollout, *, pad_token_id, temperature, top_p,
                       normalization, baseline, pathwise_term, tf_batch_size,
                       chunk_tokens=None, autocast_dtype=None, entropy="sampler") -> dict[str, Tensor]:
    """Per-token quantities of the X surrogate along ``direction`` on one E shard, float64
    ``[B*G, T]`` (prompt-major rows, zero past each response's end): ``d_entropy`` = ∂_u h_k
    (zero without ``pathwise_term``), ``d_log_q`` = ∂_u log q_k(y_k), the teacher-forced
    ``entropy`` h_k and ``log_q``, and the score-weight parts ``weight_a``, ``weight_beta``
    (:func:`estimators.score_weight_parts`: w_k = a_k − H̄ β_k). Forward-mode AD, one JVP pass;
    the output embedding ``chunk_tokens`` response tokens at a time. h is the per-prefix entropy
    ``entropy``, ``autocast_dtype`` as in :func:`x_gradient` (primal and tangent matrix products
    both in that precision; the measure on fp32 logits); ``outside_nucleus`` ``[B*G]`` counts the
    sampled tokens kept outside their recomputed nucleus (bf16 only)."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    sampled = rollouts.sampled_entropies(rollout, entropy).double()
    B, G, T = sampled.shape
    mask = estimators.response_mask(rollout["response_lens"], T)
    a, beta = (x.reshape(B * G, T) for x in estimators.score_weight_parts(sampled, mask, normalization, baseline))
    scorer = teacher_force.ResponseLogits(model)
    out = {name: torch.zeros(B * G, T, dtype=torch.float64) for name in ("d_entropy", "d_log_q", "entropy", "log_q")}
    out["outside_nucleus"] = torch.zeros(B * G, dtype=torch.float64)
    dtype = precision.autocast_dtype(autocast_dtype)
    keep = precision.keeps_sampled_tokens(dtype)

    def fn(sub, p):
        s = teacher_force.score(scorer, sub, temperature, top_p, params=p, chunk_tokens=chunk_tokens,
                                autocast_dtype=dtype, keep_tokens=keep, entropy=entropy)
        return s.entropy, s.token_log_q, s.outside_nucleus.double()

    for rows, sub, (h, lq, outside), (dh, dlq, _) in _jvp_batches(model, direction, batch, tf_batch_size, fn,
                                                                  "directional"):
        out["outside_nucleus"][rows] = outside.cpu()
        width = sub.response_tokens.shape[1]
        valid = sub.response_mask
        for name, value in (("d_entropy", dh), ("d_log_q", dlq), ("entropy", h), ("log_q", lq)):
            if name == "d_entropy" and not pathwise_term:
                continue
            out[name][rows, :width] = torch.where(valid, value.double().cpu(), 0.0)
    out["weight_a"], out["weight_beta"] = a, beta
    _log_outside(out["outside_nucleus"], "directional pass")
    return out


def directional_sums(model, direction: dict[str, Tensor], rollout, **kwargs) -> dict[str, Tensor]:
    """Per-prompt-group sums for :func:`estimators.directional_estimate` along ``direction``
    (keyword arguments of :func:`directional_tokens`): P_g, Q_g, S_g, T_g, each ``[B]`` float64."""
    return sums_of_tokens(directional_tokens(model, direction, rollout, **kwargs), rollout["response_lens"])


def sums_of_tokens(tokens: dict[str, Tensor], response_lens: Tensor) -> dict[str, Tensor]:
    """P_g = Σ_{i∈g} Σ_k [∂_u h_ik + a_ik ∂_u log q_ik], Q_g = Σ β_ik ∂_u log q_ik, S_g, T_g (and
    the group's ``outside_nucleus`` count) from :func:`directional_tokens`' per-token values
    (``response_lens`` ``[B, G]``)."""
    B, G = response_lens.shape
    per_seq = {
        "P": (tokens["d_entropy"] + tokens["weight_a"] * tokens["d_log_q"]).sum(-1),
        "Q": (tokens["weight_beta"] * tokens["d_log_q"]).sum(-1),
        "S": tokens["entropy"].sum(-1),
    }
    if "outside_nucleus" in tokens:  # per sequence already
        per_seq["outside_nucleus"] = tokens["outside_nucleus"]
    sums = {name: x.reshape(B, G).sum(-1) for name, x in per_seq.items()}
    sums["T"] = response_lens.double().reshape(B, G).sum(-1)
    return sums


def u_directional_tokens(model, direction: dict[str, Tensor], rollout, *, pad_token_id, temperature,
                         tf_batch_size, chunk_tokens=None) -> dict[str, Tensor]:
    """The U-side per-token terms along ``direction`` (u = J X, :func:`update.update_jacobian`):
    ``d_log_p`` = ∂_u log p_ik(y_ik) and ``log_p`` = log softmax(z_ik/τ)(y_ik) (the trainer's
    log-probs, no top-p), float64 ``[B*G, T]``, prompt-major rows, zero past each response's end.
    One JVP pass; c_i·d_log_p is each token's term of X·J·Y (:mod:`entropy_probe.attribution`)."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    B, G, T = rollout["token_log_q"].shape
    scorer = teacher_force.ResponseLogits(model)
    out = {name: torch.zeros(B * G, T, dtype=torch.float64) for name in ("d_log_p", "log_p")}

    def fn(sub, p):
        return teacher_force.score(scorer, sub, temperature, 1.0, want_q=False, want_tempered=True, params=p,
                                   chunk_tokens=chunk_tokens).tempered_log_p

    for rows, sub, lp, dlp in _jvp_batches(model, direction, batch, tf_batch_size, fn, "U directional"):
        width = sub.response_tokens.shape[1]
        out["log_p"][rows, :width] = torch.where(sub.response_mask, lp.double().cpu(), 0.0)
        out["d_log_p"][rows, :width] = torch.where(sub.response_mask, dlp.double().cpu(), 0.0)
    return out
