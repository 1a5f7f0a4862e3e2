"""ΔH(η) = H(θ + ηv) − H(θ) by self-normalized importance sampling on the E batch (DESIGN §2).

The per-shard pass teacher-forces the E responses at θ and at each θ' = θ + ηv (parameters
applied with ``functional_call``, the model is never modified), keeping at every position the
nucleus chosen at θ; the reduction over the whole E batch is in float64. S and S' are stored for
both per-prefix entropies (``estimator.entropy``, :data:`measure.ENTROPIES`: the weights come from q
either way), so the reduction chooses and a change of the choice reruns no pass.

Where SNIS fails: with a low effective sample size its delta-method SE is not to be trusted
(:data:`MIN_ESS_FRACTION`, calibrated by ``benchmarks/snis_ess_calibration.py``); the report flags
such rows and points to the sampler's own change, measured by coupled fresh rollouts
(:mod:`entropy_probe.fresh`).
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from . import measure, normalization as norm, parameters, precision, teacher_force, tf_layout

# Rows with ESS/N below this are flagged: their ±2 SE interval under-covers the exact ΔH (README,
# "SNIS where it fails"; measured by benchmarks/snis_ess_calibration.py).
MIN_ESS_FRACTION = 0.1

# per-sequence fields of an SNIS shard holding (S at θ, S' at each θ') for each entropy
ENTROPY_FIELDS = {"sampler": ("S", "S_shifted"), "tempered_full": ("S_tempered_full", "S_shifted_tempered_full")}


def _tokens_scores(logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-token log q(y) and h under the given nucleus ``mask``: ``[R, V] -> [R], [R]`` (fp32)."""
    lq = measure.log_q(logits, mask, temperature)
    return lq.gather(-1, tokens[..., None]).squeeze(-1), measure.rb_entropy(lq, mask)


def snis_pass(model, direction: dict[str, Tensor], rollout: dict[str, Tensor], etas: list[float], *,
              pad_token_id: int, temperature: float, top_p: float, tf_batch_size: int,
              chunk_tokens: int | None = None, autocast_dtype=None) -> dict[str, Tensor]:
    """Per-sequence quantities of one E shard: ``log_w`` and ``S_shifted`` ``[len(etas), N]``
    (log q_θ'(y) − log q_θ(y) and S'(y), both with θ's nucleus), ``own_nucleus_differs``
    ``[len(etas), N]`` (θ''s own nucleus differs from θ's at some position), ``S`` and ``T``
    ``[N]`` at θ; ``S_shifted_tempered_full`` and ``S_tempered_full``: the same sums of the full
    tempered entropy (:func:`measure.full_entropy`); ``outside_nucleus`` ``[N]`` (bf16: sampled
    tokens kept outside θ's recomputed nucleus, :func:`precision.keeps_sampled_tokens`). Rows are
    prompt-major (b*G + g).

    Per batch of ``tf_batch_size`` sequences the decoder runs once at θ and once per η (final
    hidden states of the valid response tokens only); then the output embedding is applied
    ``chunk_tokens`` tokens at a time, θ's logits giving the nucleus that every θ' of the chunk
    reuses: one chunk of ``[chunk, V]`` logits per parameter point lives at once."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    scorer = teacher_force.ResponseLogits(model)
    n = batch.input_ids.shape[0]
    out = {
        "log_w": torch.zeros(len(etas), n, dtype=torch.float64),
        "S_shifted": torch.zeros(len(etas), n, dtype=torch.float64),
        "own_nucleus_differs": torch.zeros(len(etas), n, dtype=torch.bool),
        "outside_nucleus": torch.zeros(n, dtype=torch.float64),
        "S": torch.zeros(n, dtype=torch.float64),
        "S_shifted_tempered_full": torch.zeros(len(etas), n, dtype=torch.float64),
        "S_tempered_full": torch.zeros(n, dtype=torch.float64),
        "T": batch.response_lens.double(),
    }
    device = next(model.parameters()).device
    dtype = precision.autocast_dtype(autocast_dtype)
    keep = precision.keeps_sampled_tokens(dtype)
    points = [{f"policy.{k}": t for k, t in parameters.shifted(model, direction, eta).items()} for eta in [0.0, *etas]]
    with torch.no_grad():
        for batch_rows in tqdm(tf_layout.length_sorted_batches(batch, tf_batch_size), desc="SNIS", unit="batch"):
            sub = batch.select(batch_rows)
            rows, cols, tokens = tf_layout.valid_pairs(sub, device)
            heads = [teacher_force.response_hidden_and_head(scorer, sub, rows, cols, params, dtype) for params in points]
            m = len(batch_rows)
            log_q_sum = torch.zeros(len(points), m, dtype=torch.float64, device=device)
            S_sum = torch.zeros(len(points), m, dtype=torch.float64, device=device)
            S_full_sum = torch.zeros(len(points), m, dtype=torch.float64, device=device)
            differs = torch.zeros(len(points), m, dtype=torch.float64, device=device)
            outside = torch.zeros(m, dtype=torch.float64, device=device)
            start = 0
            for size in tf_layout.chunk_sizes(len(rows), chunk_tokens):
                sl = slice(start, start + size)
                start += size
                r, y = rows[sl], tokens[sl]
                nucleus = None
                for j, (hidden, head) in enumerate(heads):
                    logits = head(hidden[sl])
                    if nucleus is None:
                        nucleus = measure.nucleus_mask(logits, temperature, top_p)
                        if keep:  # bf16: a sampled token just outside θ's recomputed nucleus is kept in it
                            missing = ~nucleus.gather(-1, y[:, None]).squeeze(-1)
                            outside.index_add_(0, r, missing.double())
                            nucleus.scatter_(-1, y[:, None], True)
                    elif top_p < 1.0:
                        own = measure.nucleus_mask(logits, temperature, top_p)
                        differs[j].index_add_(0, r, (own != nucleus).any(-1).double())
                    token_lq, entropy = _tokens_scores(logits, y, nucleus, temperature)
                    full = entropy if top_p >= 1.0 else measure.full_entropy(logits, temperature)
                    log_q_sum[j].index_add_(0, r, token_lq.double())
                    S_sum[j].index_add_(0, r, entropy.double())
                    S_full_sum[j].index_add_(0, r, full.double())
                    del logits
            log_q_sum, S_sum, differs, S_full_sum = log_q_sum.cpu(), S_sum.cpu(), differs.cpu(), S_full_sum.cpu()
            out["S"][batch_rows] = S_sum[0]
            out["S_tempered_full"][batch_rows] = S_full_sum[0]
            out["S_shifted_tempered_full"][:, batch_rows] = S_full_sum[1:]
            out["log_w"][:, batch_rows] = log_q_sum[1:] - log_q_sum[0]
            out["S_shifted"][:, batch_rows] = S_sum[1:]
            out["own_nucleus_differs"][:, batch_rows] = differs[1:] > 0
            out["outside_nucleus"][batch_rows] = outside.cpu()
    return out


def delta_h(log_w: Tensor, S_shifted: Tensor, S: Tensor, T: Tensor, own_differs: Tensor, G: int,
            normalization: str) -> dict:
    """ΔH at one η from whole-batch per-sequence values ``[N]`` (prompt-major), float64.

    w_i = exp(lw_i − max lw); H(θ') = Σ w S' / Σ w D and H̄(θ) = Σ S / Σ D on the same batch
    (paired), D the normalization's per-response denominator; SE by the delta method over
    prompt groups (:func:`normalization.ratio_influence` of both ratios). ``ess_low``: ESS/N
    below :data:`MIN_ESS_FRACTION` (the SE is not to be trusted there).
    """
    log_w, S = log_w.double(), S.double()
    w = torch.exp(log_w - log_w.max())
    ess = float(w.sum() ** 2 / (w**2).sum())
    H_shifted, H_base, influence = ratio_terms(log_w, S_shifted, S, T, G, normalization)
    return {
        "delta_h": H_shifted - H_base,
        "se": norm.standard_error(influence),
        "H_shifted": H_shifted,
        "H_base": H_base,
        "H_base_se": norm.standard_error(base_influence(S, T, G, normalization)[1]),
        "ess": ess,
        "ess_fraction": ess / S.numel(),
        "ess_low": ess < MIN_ESS_FRACTION * S.numel(),
        "num_sequences": int(S.numel()),
        "log_weight_min": float(log_w.min()),
        "log_weight_max": float(log_w.max()),
        "own_nucleus_differs_share": float((w * own_differs.double()).sum() / w.sum()),
    }


def ratio_terms(log_w: Tensor, S_shifted: Tensor, S: Tensor, T: Tensor, G: int,
                normalization: str) -> tuple[float, float, Tensor]:
    """(H(θ'), H̄(θ), ψ): the two ratios of :func:`delta_h` and the per-prompt-group linearized
    contributions ψ_b of ΔH = H(θ') − H̄(θ) (``[n]``; the SE is sd(ψ)/√n)."""
    log_w, S_shifted = log_w.double(), S_shifted.double()
    D = norm.get(normalization).denominators(T)
    w = torch.exp(log_w - log_w.max())
    H_shifted, psi_shifted = norm.ratio_influence(norm.group_sums(w * S_shifted, G), norm.group_sums(w * D, G))
    H_base, psi_base = base_influence(S, T, G, normalization)
    return H_shifted, H_base, psi_shifted - psi_base


def base_influence(S: Tensor, T: Tensor, G: int, normalization: str) -> tuple[float, Tensor]:
    """(H̄(θ), ψ): the plug-in entropy of the batch and its per-prompt-group influence terms."""
    D = norm.get(normalization).denominators(T)
    return norm.ratio_influence(norm.group_sums(S.double(), G), norm.group_sums(D, G))


def delta_h_sweep(loaded: list[tuple[dict[str, Tensor], dict]], G: int, normalization: str,
                  entropy: str = "sampler") -> dict:
    """ΔH(η) of the per-prefix entropy ``entropy`` for every η of SNIS shards (tensors, metadata)
    over the whole E batch: {normalization, entropy, model_fingerprint, precision, min_ess_fraction,
    tokens_outside_recomputed_nucleus, rows (one :func:`delta_h` per η)}. The shards must agree on
    the η sweep, the model and the precision (ValueError)."""
    if len({repr((m["etas"], m["model_fingerprint"], m.get("precision"))) for _, m in loaded}) != 1:
        raise ValueError("SNIS shards disagree on the η sweep, the model or the precision")
    S_field, S_shifted_field = ENTROPY_FIELDS[entropy]
    if any(S_field not in t for t, _ in loaded):
        raise ValueError(f"no {S_field!r} in an SNIS shard (written before both entropies were stored): rerun it "
                         "(snakemake --forcerun snis_shard)")
    etas = loaded[0][1]["etas"]
    cat = {k: torch.cat([t[k] for t, _ in loaded], dim=-1)
           for k in ("log_w", S_shifted_field, "own_nucleus_differs", S_field, "T")}
    rows = [{"eta": eta, **delta_h(cat["log_w"][j], cat[S_shifted_field][j], cat[S_field], cat["T"],
                                   cat["own_nucleus_differs"][j], G, normalization)} for j, eta in enumerate(etas)]
    outside = int(sum(float(t["outside_nucleus"].sum()) for t, _ in loaded if "outside_nucleus" in t))
    return {"normalization": normalization, "entropy": entropy, "model_fingerprint": loaded[0][1]["model_fingerprint"],
            "precision": loaded[0][1].get("precision"), "min_ess_fraction": MIN_ESS_FRACTION,
            "tokens_outside_recomputed_nucleus": outside, "rows": rows}
