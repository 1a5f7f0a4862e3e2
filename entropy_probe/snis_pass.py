"""The SNIS pass over one E shard (DESIGN §2 "ΔH(η) by SNIS"). The E responses teacher-forced at θ
and at each θ' = θ + ηv (parameters applied with ``functional_call``, the model is never
modified), keeping at every position the nucleus chosen at θ, with the per-sequence log-weights
and entropies the statistics of :mod:`entropy_probe.snis` reduce over the whole E batch. Both
per-prefix entropies are stored (:data:`entropy_probe.entropies.ENTROPY_KINDS`: the weights come
from q either way), so the reduction chooses and a change of the choice reruns no pass.
"""
from __future__ import annotations

import torch
from torch import Tensor
from tqdm import tqdm

from . import entropies, measure, parameters, precision, teacher_force, tf_layout


def _tokens_scores(logits: Tensor, tokens: Tensor, mask: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-token log q(y) and h under the given nucleus ``mask``: ``[R, V] -> [R], [R]`` (fp32)."""
    lq = measure.log_q(logits, mask, temperature)
    return lq.gather(-1, tokens[..., None]).squeeze(-1), measure.rb_entropy(lq, mask)


def snis_pass(model, direction: dict[str, Tensor], rollout: dict[str, Tensor], etas: list[float], *,
              pad_token_id: int, temperature: float, top_p: float, tf_batch_size: int,
              chunk_tokens: int | None = None, autocast_dtype=None) -> dict[str, Tensor]:
    """Per-sequence quantities of one E shard: ``log_w`` and S' ``[len(etas), N]`` (log q_θ'(y) −
    log q_θ(y) and S'(y), both with θ's nucleus), ``own_nucleus_differs`` ``[len(etas), N]`` (θ''s
    own nucleus differs from θ's at some position), S and ``T`` ``[N]`` at θ, S and S' for each
    entropy under the names of its :attr:`entropies.EntropyKind.snis_fields`; ``outside_nucleus`` ``[N]`` (bf16: sampled
    tokens kept outside θ's recomputed nucleus, :func:`precision.keeps_sampled_tokens`). Rows are
    prompt-major (b*G + g).

    Per batch of ``tf_batch_size`` sequences the decoder runs once at θ and once per η (final
    hidden states of the valid response tokens only); then the output embedding is applied
    ``chunk_tokens`` tokens at a time, θ's logits giving the nucleus that every θ' of the chunk
    reuses: one chunk of ``[chunk, V]`` logits per parameter point lives at once."""
    batch = tf_layout.from_rollout(rollout, pad_token_id)
    scorer = teacher_force.ResponseLogits(model)
    n = batch.input_ids.shape[0]
    (S, S_shifted), (S_full, S_full_shifted) = (entropies.get(name).snis_fields for name in ("sampler", "tempered_full"))
    out = {
        "log_w": torch.zeros(len(etas), n, dtype=torch.float64),
        S_shifted: torch.zeros(len(etas), n, dtype=torch.float64),
        "own_nucleus_differs": torch.zeros(len(etas), n, dtype=torch.bool),
        "outside_nucleus": torch.zeros(n, dtype=torch.float64),
        S: torch.zeros(n, dtype=torch.float64),
        S_full_shifted: torch.zeros(len(etas), n, dtype=torch.float64),
        S_full: torch.zeros(n, dtype=torch.float64),
        "T": batch.response_lens.double(),
    }
    device = next(model.parameters()).device
    dtype = precision.autocast_dtype(autocast_dtype)
    keep = precision.keeps_sampled_tokens(dtype)
    points = [parameters.shifted(model, direction, eta) for eta in [0.0, *etas]]
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
            out[S][batch_rows] = S_sum[0]
            out[S_full][batch_rows] = S_full_sum[0]
            out[S_full_shifted][:, batch_rows] = S_full_sum[1:]
            out["log_w"][:, batch_rows] = log_q_sum[1:] - log_q_sum[0]
            out[S_shifted][:, batch_rows] = S_sum[1:]
            out["own_nucleus_differs"][:, batch_rows] = differs[1:] > 0
            out["outside_nucleus"][batch_rows] = outside.cpu()
    return out
