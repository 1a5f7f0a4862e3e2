"""What the stages share: the policy loaded with its checks, rollout shards read with their
provenance checked against the config (one header, written by the rollout stage and expected by
every reader), the whole-E-batch plug-ins."""
from __future__ import annotations

import logging

import torch

from .. import guards, models, normalization, parameters, shards
from ..entropies import ENTROPY_KINDS
from ..rollout import sampled_entropies
from ..stage_keys import SAMPLING

log = logging.getLogger(__name__)


def rollout_header(cfg: dict, kind: str, fingerprint: str) -> dict:
    """The provenance a rollout shard of batch ``kind`` records and every reader of it checks:
    the model, the sampling measure (temperature, top-p, response cap), the seed of its noise, G
    and the precision of the passes that drew it."""
    return {
        "batch_kind": kind,
        "model_fingerprint": fingerprint,
        "generation": {key.split(".")[1]: cfg["generation"][key.split(".")[1]] for key in SAMPLING[:3]},
        "seed": cfg["batch_config"]["seed"],
        "G": cfg["batch_config"]["G"],
        "precision": cfg["model"]["precision"],
    }


def load_policy(cfg: dict, policy: str, trainable: str = "auto"):
    """(model, tokenizer, fingerprint), weights checked finite. ``trainable`` (``model.trainable``)
    matters only to passes that select parameters (:func:`load_for_gradients`)."""
    torch.manual_seed(0)
    model = models.load_policy(policy, cfg["model"]["dtype"], cfg["model"]["device"], trainable)
    tokenizer = models.load_tokenizer(policy)
    guards.check_parameters(dict(model.named_parameters()), "weight", str(policy))
    return model, tokenizer, models.fingerprint(policy)


def load_for_gradients(cfg: dict, policy: str):
    """(model, tokenizer, selected parameters, fingerprint) for a pass that differentiates: the
    parameters of ``model.trainable`` narrowed by ``model.param_filter``."""
    model, tokenizer, fingerprint = load_policy(cfg, policy, cfg["model"]["trainable"])
    params = parameters.select(model, cfg["model"]["param_filter"])
    log.info("%d parameter tensors (%d values) selected by model.param_filter %r", len(params),
             sum(p.numel() for p in params.values()), cfg["model"]["param_filter"])
    return model, tokenizer, params, fingerprint


def read_rollouts(paths: list[str], cfg: dict, kind: str, fingerprint: str) -> list[dict]:
    """Rollout shards checked against the config (header) and for non-finite values."""
    out = []
    for path in paths:
        tensors, _ = shards.read_shard(path, rollout_header(cfg, kind, fingerprint))
        B, G, T = tensors["token_log_q"].shape
        fields = [kind.rollout_field for kind in ENTROPY_KINDS.values()]
        missing = [f for f in fields if f not in tensors]
        if missing:
            raise shards.ShardError(f"{path}: no {missing[0]!r} (written before both per-prefix entropies were "
                                    "recorded at sampling time): regenerate it (snakemake --forcerun rollout)")
        for name in ("token_log_q", *fields, "rewards"):
            guards.check_sequences(tensors[name].reshape(B * G, -1), name, str(path))
        out.append(tensors)
    return out


def e_batch_stats(rollouts: list[dict], entropy: str = "sampler") -> dict:
    """Whole-E-batch plug-ins (:func:`normalization.batch_plugins`) from the sampling-time
    per-prefix entropies of kind ``entropy`` (``estimator.entropy``) of every E shard, never per
    shard; also the number of prompt groups and the entropy's name."""
    S = torch.cat([sampled_entropies(r, entropy).double().sum(-1).reshape(-1) for r in rollouts])
    T = torch.cat([r["response_lens"].reshape(-1) for r in rollouts])
    return normalization.batch_plugins(S, T) | {"num_groups": sum(r["response_lens"].shape[0] for r in rollouts),
                                                "entropy": entropy}
