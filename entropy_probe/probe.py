"""Stage logic shared by the scripts: loading a stage's inputs with provenance checks and the
common metadata (the scripts stay thin adapters of the ``snakemake`` object or argv)."""
from __future__ import annotations

import logging

import torch

from . import guards, models, shards, teacher_force

log = logging.getLogger(__name__)


def rollout_expectations(cfg: dict, kind: str, fingerprint: str) -> dict:
    """Header values a rollout shard must carry to be used with this config."""
    gen = cfg["generation"]
    return {
        "batch_kind": kind,
        "model_fingerprint": fingerprint,
        "generation": {k: gen[k] for k in ("temperature", "top_p", "max_new_tokens")},
        "seed": cfg["batch_config"]["seed"],
        "G": cfg["batch_config"]["G"],
    }


def load_for_teacher_forcing(cfg: dict, policy_dir: str):
    """(model, tokenizer, selected parameters, fingerprint) for a gradient pass."""
    torch.manual_seed(0)
    model = models.load_policy(policy_dir, cfg["model"]["dtype"], cfg["model"]["device"])
    tokenizer = models.load_tokenizer(policy_dir)
    guards.check_parameters(dict(model.named_parameters()), "weight", str(policy_dir))
    params = teacher_force.selected_parameters(model, cfg["estimator"]["param_filter"])
    log.info("%d parameter tensors (%d values) selected by param_filter %r", len(params),
             sum(p.numel() for p in params.values()), cfg["estimator"]["param_filter"])
    return model, tokenizer, params, models.fingerprint(policy_dir)


def read_rollouts(paths: list[str], cfg: dict, kind: str, fingerprint: str) -> list[dict]:
    """Rollout shards checked against the config (header) and for non-finite values."""
    out = []
    for path in paths:
        tensors, _ = shards.read_shard(path, rollout_expectations(cfg, kind, fingerprint))
        B, G, T = tensors["token_log_q"].shape
        for name in ("token_log_q", "rb_entropies", "rewards", "advantages"):
            guards.check_sequences(tensors[name].reshape(B * G, -1), name, str(path))
        out.append(tensors)
    return out


def e_batch_stats(rollouts: list[dict]) -> dict:
    """Whole-E-batch plug-ins H̄ = ΣS/ΣT and T̄ (sampling-time RB entropies), never per shard."""
    S = sum(float(r["rb_entropies"].double().sum()) for r in rollouts)
    T = sum(float(r["response_lens"].double().sum()) for r in rollouts)
    N = sum(r["response_lens"].numel() for r in rollouts)
    groups = sum(r["response_lens"].shape[0] for r in rollouts)
    return {"H_bar_token": S / T, "H_bar_sequence": S / N, "sum_S": S, "sum_T": T,
            "num_sequences": N, "num_groups": groups, "mean_T": T / N}
