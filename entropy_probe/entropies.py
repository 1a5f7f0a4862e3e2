"""Which per-prefix entropy h_k the probe measures (``estimator.entropy``), and where each shard
keeps it (DESIGN §2b "Which entropy").

- ``sampler``: the RB entropy of the sampling measure q_k (temperature and top-p nucleus,
  renormalised), −Σ_{v∈S_k} q_k(v) log q_k(v).
- ``tempered_full``: the full-vocabulary entropy of p_k = softmax(z_k/τ), −Σ_{v∈V} p_k(v) log p_k(v),
  what TRL and verl log as ``entropy`` (no top-p on the training side).

Responses are drawn from q either way; with top_p = 1 the two are the same number. Rollout, SNIS
and fresh-rollout shards record both, so a change of the choice reruns no pass over the
rollouts: every reader picks its fields from :data:`ENTROPY_KINDS`. The per-token values
themselves are computed in :mod:`entropy_probe.measure`.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EntropyKind:
    name: str
    description: str  # for the report's legend
    full_vocabulary: bool  # over the whole vocabulary (no nucleus)
    rollout_field: str  # per-token values at sampling time, [B, G, T], in rollout and fresh shards
    snis_fields: tuple[str, str]  # per-sequence S at θ and S' at each θ' in an SNIS shard
    fresh_base_field: str  # per-response S at θ in a fresh-rollout shard


ENTROPY_KINDS = {
    "sampler": EntropyKind("sampler", "sampler = RB entropy of q (nucleus, renormalised)", False,
                           "rb_entropies", ("S", "S_shifted"), "base_S"),
    "tempered_full": EntropyKind("tempered_full",
                                 "tempered_full = full-vocabulary entropy of softmax(z/τ), as TRL/verl log it", True,
                                 "tempered_entropies", ("S_tempered_full", "S_shifted_tempered_full"),
                                 "base_S_tempered_full"),
}


def get(name: str) -> EntropyKind:
    if name not in ENTROPY_KINDS:
        raise ValueError(f"estimator.entropy: unknown entropy {name!r} ({' | '.join(ENTROPY_KINDS)})")
    return ENTROPY_KINDS[name]
