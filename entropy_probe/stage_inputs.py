"""Stage logic shared by the scripts: loading a stage's inputs with provenance checks and the
common metadata (the scripts stay thin adapters of the ``snakemake`` object or argv)."""
from __future__ import annotations

import logging

import torch

from . import guards, models, normalization, parameters, rollout, shards

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
        "precision": cfg["model"]["precision"],
    }


def load_policy(cfg: dict, policy_dir: str, trainable: str = "auto"):
    """(model, tokenizer, fingerprint), weights checked finite. ``trainable`` (``model.trainable``)
    matters only to passes that select parameters (:func:`load_for_teacher_forcing`)."""
    torch.manual_seed(0)
    model = models.load_policy(policy_dir, cfg["model"]["dtype"], cfg["model"]["device"], trainable)
    tokenizer = models.load_tokenizer(policy_dir)
    guards.check_parameters(dict(model.named_parameters()), "weight", str(policy_dir))
    return model, tokenizer, models.fingerprint(policy_dir)


def load_for_teacher_forcing(cfg: dict, policy_dir: str):
    """(model, tokenizer, selected parameters, fingerprint) for a gradient pass: the parameters
    of ``model.trainable`` narrowed by ``estimator.param_filter``."""
    model, tokenizer, fingerprint = load_policy(cfg, policy_dir, cfg["model"]["trainable"])
    params = parameters.select(model, cfg["estimator"]["param_filter"])
    log.info("%d parameter tensors (%d values) selected by param_filter %r", len(params),
             sum(p.numel() for p in params.values()), cfg["estimator"]["param_filter"])
    return model, tokenizer, params, fingerprint


def read_rollouts(paths: list[str], cfg: dict, kind: str, fingerprint: str) -> list[dict]:
    """Rollout shards checked against the config (header) and for non-finite values."""
    out = []
    for path in paths:
        tensors, _ = shards.read_shard(path, rollout_expectations(cfg, kind, fingerprint))
        B, G, T = tensors["token_log_q"].shape
        missing = [f for f in rollout.ENTROPY_FIELDS.values() if f not in tensors]
        if missing:
            raise shards.ShardError(f"{path}: no {missing[0]!r} (written before both per-prefix entropies were "
                                    "recorded at sampling time): regenerate it (snakemake --forcerun rollout)")
        for name in ("token_log_q", *rollout.ENTROPY_FIELDS.values(), "rewards"):
            guards.check_sequences(tensors[name].reshape(B * G, -1), name, str(path))
        out.append(tensors)
    return out


def e_batch_stats(rollouts: list[dict], entropy: str = "sampler") -> dict:
    """Whole-E-batch plug-ins (:func:`normalization.batch_plugins`) from the sampling-time
    per-prefix entropies of kind ``entropy`` (``estimator.entropy``) of every E shard, never per
    shard; also the number of prompt groups and the entropy's name."""
    S = torch.cat([rollout.sampled_entropies(r, entropy).double().sum(-1).reshape(-1) for r in rollouts])
    T = torch.cat([r["response_lens"].reshape(-1) for r in rollouts])
    return normalization.batch_plugins(S, T) | {"num_groups": sum(r["response_lens"].shape[0] for r in rollouts),
                                                "entropy": entropy}


def rows_of_shard(batch_table: dict, rollout: dict, where: str) -> torch.Tensor:
    """Indices of the rows of a whole-batch per-prompt-group table (``prompt_ids`` ``[B]``, e.g.
    the U objective's weights) that hold this rollout shard's prompt groups, in the shard's order
    (the U batch's prompts are distinct)."""
    ids, mine = batch_table["prompt_ids"], rollout["prompt_ids"]
    match = ids[:, None] == mine[None, :]
    if not bool((match.sum(0) == 1).all()):
        raise shards.ShardError(f"{where}: does not hold each prompt group of the rollout shard exactly once "
                                "(a batch table of another run?)")
    return match.int().argmax(0)
