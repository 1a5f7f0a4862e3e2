"""Whole-batch plug-ins (E) and objective weights (U), then the X and Y gradient shards and their
reduction (DESIGN §2 "X = ∇H", "Y and v")."""
from __future__ import annotations

from typing import Annotated

import logging

import torch

from .. import gradients, guards, job_cost, losses, models, passes, shards
from ..rollout import rows_in
from ..stage import Arg, In, Out
from .inputs import e_batch_stats, load_for_gradients, read_rollouts

log = logging.getLogger(__name__)


def e_stats(cfg: dict, *, policy: Annotated[str, In("the policy directory or spec")], rollouts: Annotated[list[str], In("every E rollout shard")],
            stats: Annotated[str, Out("the plug-ins, results/estimates/e_stats.json")]) -> None:
    """Whole-E-batch plug-ins (H̄, T̄) from the E rollout shards' sampling-time per-prefix entropies
    (estimator.entropy: the RB entropy of q, or the full tempered one)."""
    read = read_rollouts(rollouts, cfg, "E", models.fingerprint(policy))
    plugins = e_batch_stats(read, cfg["estimator"]["entropy"])
    shards.write_json(stats, plugins)
    log.info("E batch: %s", plugins)


def u_objective_of(cfg: dict, policy: str, rollouts: list[str]) -> tuple[dict, dict]:
    """(tensors, header) of the U objective: the U batch's advantages and each response's loss
    coefficient (numerator a_i and normalizer term z_i) under update.loss_type, over the whole U
    batch, and how many prompt groups have non-zero advantages."""
    fingerprint = models.fingerprint(policy)
    read = read_rollouts(rollouts, cfg, "U", fingerprint)
    upd = cfg["update"]
    rewards = torch.cat([r["rewards"] for r in read])
    lengths = torch.cat([r["response_lens"] for r in read])
    advantages = losses.group_advantages(rewards, upd["scale_rewards"])
    numerators, normalizer_terms = losses.response_weights(upd["loss_type"], advantages, lengths,
                                                           losses.settings_from_config(cfg))
    informative = losses.informative_groups(rewards)
    log.info("U batch: %d of %d prompt groups have non-zero advantages; loss %s (%s), normalizer %.6g", informative,
             rewards.shape[0], upd["loss_type"], losses.resolve(upd["loss_type"]).formula, float(normalizer_terms.sum()))
    shard_index = torch.cat([torch.full((r["rewards"].shape[0],), i) for i, r in enumerate(read)])
    tensors = {"advantages": advantages, "coefficients": numerators, "normalizer_terms": normalizer_terms,
               "prompt_ids": torch.cat([r["prompt_ids"] for r in read]), "shard_index": shard_index}
    header = {"kind": "u_objective", "model_fingerprint": fingerprint, "loss_type": upd["loss_type"],
              "loss_formula": losses.resolve(upd["loss_type"]).formula, "scale_rewards": upd["scale_rewards"],
              "informative_groups": informative, "num_groups": rewards.shape[0], "G": rewards.shape[1]}
    return tensors, header


def u_objective(cfg: dict, *, policy: Annotated[str, In("the policy directory or spec")], rollouts: Annotated[list[str], In("every U rollout shard")],
                objective: Annotated[str, Out("results/estimates/u_objective.safetensors")]) -> None:
    """The GRPO objective's weights on the whole U batch: advantages from the rewards
    (update.scale_rewards) and each response's coefficient of Σ_k log p_ik under update.loss_type
    (entropy_probe.losses), and how many prompt groups carry a gradient at all. With
    update.optimizer: sgd and no such group, v = 0 and every later stage would be wasted: the run
    stops here, before any teacher forcing, saying so."""
    tensors, header = u_objective_of(cfg, policy, rollouts)
    if header["informative_groups"] == 0 and cfg["update"]["optimizer"] == "sgd":
        raise losses.NoSignalError(
            f"no prompt group of the U batch ({header['num_groups']} groups of G = {header['G']}) has a non-zero "
            "advantage (every group's rewards are equal), so with update.optimizer: sgd v = 0 and δH₁ = 0: stopped "
            "before teacher forcing. Raise batch_config.B_U or G, use a reward that separates responses, or use "
            "update.optimizer: adamw with the checkpoint's optimizer state")
    shards.write_shard(objective, tensors, header)


def teacher_force_x(cfg: dict, *, rollout: Annotated[str, In("an E rollout shard")], policy: Annotated[str, In("the policy directory or spec")],
                    batch: Annotated[str, In("the E batch's plug-ins, results/estimates/e_stats.json")],
                    gradient: Annotated[str, Out("the shard's X partial sum, results/teacher_force/X/shard_<shard>.safetensors")]
                    ) -> None:
    """One X gradient shard: ∇ of the entropy-gradient surrogate summed over an E shard (with the
    whole-E-batch plug-ins), unnormalized: the reduction divides by ΣT (or N) of the whole batch."""
    gen, tf, est = cfg["generation"], cfg["teacher_forcing"], cfg["estimator"]
    model, tokenizer, params, fingerprint = load_for_gradients(cfg, policy)
    [read] = read_rollouts([rollout], cfg, "E", fingerprint)
    plugins = shards.read_json(batch)
    if plugins.get("entropy") != est["entropy"]:
        raise shards.ShardError(f"{batch}: plug-ins of the {plugins.get('entropy')!r} entropy, expected "
                                f"{est['entropy']!r} (estimator.entropy)")
    H_bar = plugins["H_bar_token"]
    grads, stats = passes.x_gradient(
        model, params, read, pad_token_id=tokenizer.pad_token_id, temperature=gen["temperature"], top_p=gen["top_p"],
        H_bar=H_bar, normalization=est["normalization"], baseline=est["baseline"],
        pathwise_term=est["pathwise_term"], entropy=est["entropy"], tf_batch_size=tf["batch_size"],
        chunk_tokens=tf["chunk_tokens"], autocast_dtype=cfg["model"]["precision"],
        gradient_checkpointing=tf["gradient_checkpointing"],
    )
    guards.check_parameters(grads, "X gradient", rollout)
    for name, values in stats.items():
        guards.check_sequences(values, f"teacher-forced {name}", rollout)
    header = {"kind": "X", "model_fingerprint": fingerprint, "param_filter": cfg["model"]["param_filter"],
              "precision": cfg["model"]["precision"], "H_bar": H_bar, "normalization": est["normalization"],
              "baseline": est["baseline"], "pathwise_term": est["pathwise_term"], "entropy": est["entropy"],
              "tokens_outside_recomputed_nucleus": int(stats["outside_nucleus"].sum()),
              "cost": _gradient_cost(read, tf["gradient_checkpointing"])}
    shards.write_shard(gradient, gradients.pack(grads, {"T": stats["T"]}, "X"), header)
    log.info(job_cost.describe(header["cost"]))
    log.info("wrote %s: %d tensors, |grad sum| = %.4g", gradient, len(grads), gradients.global_norm(grads))


def teacher_force_y(cfg: dict, *, rollout: Annotated[str, In("a U rollout shard")], policy: Annotated[str, In("the policy directory or spec")],
                    batch: Annotated[str, In("the U objective, results/estimates/u_objective.safetensors")],
                    gradient: Annotated[str, Out("the shard's Y partial sum, results/teacher_force/Y/shard_<shard>.safetensors")]
                    ) -> None:
    """One Y gradient shard: ∇ Σ_i a_i Σ_k log p_ik over a U shard with the whole-U-batch
    numerators of the U objective, unnormalized (the shard's share of the normalizer rides in its
    header: the reduction divides once)."""
    gen, tf = cfg["generation"], cfg["teacher_forcing"]
    model, tokenizer, params, fingerprint = load_for_gradients(cfg, policy)
    [read] = read_rollouts([rollout], cfg, "U", fingerprint)
    objective, objective_meta = shards.read_shard(batch, {"kind": "u_objective", "model_fingerprint": fingerprint})
    rows = rows_in(objective, read, batch)
    grads = passes.y_gradient(model, params, read, objective["coefficients"][rows], pad_token_id=tokenizer.pad_token_id,
                              temperature=gen["temperature"], tf_batch_size=tf["batch_size"],
                              chunk_tokens=tf["chunk_tokens"], autocast_dtype=cfg["model"]["precision"],
                              gradient_checkpointing=tf["gradient_checkpointing"])
    guards.check_parameters(grads, "Y gradient", rollout)
    header = {"kind": "Y", "model_fingerprint": fingerprint, "param_filter": cfg["model"]["param_filter"],
              "precision": cfg["model"]["precision"], "loss_type": objective_meta["loss_type"],
              "normalizer_share": float(objective["normalizer_terms"][rows].sum()),
              "cost": _gradient_cost(read, tf["gradient_checkpointing"])}
    shards.write_shard(gradient, gradients.pack(grads, {}, "Y"), header)
    log.info(job_cost.describe(header["cost"]))
    log.info("wrote %s: %d tensors, |grad sum| = %.4g", gradient, len(grads), gradients.global_norm(grads))


def _gradient_cost(read: dict, gradient_checkpointing: bool) -> dict:
    """A gradient pass's cost: one forward and one backward over the shard's sequences, the
    forward twice when each decoder layer is recomputed in the backward."""
    tokens = job_cost.sequence_tokens(read)
    return job_cost.record(forward=tokens * (2 if gradient_checkpointing else 1), backward=tokens)


# the header values every shard of one reduction shares
SHARED_KEYS = ("model_fingerprint", "param_filter", "normalization", "baseline", "H_bar", "loss_type", "precision",
               "entropy", "pathwise_term")
PER_SHARD_KEYS = ("schema_version", "normalizer_share", "tokens_outside_recomputed_nucleus", "cost")


def reduce_gradients(*, kind: Annotated[str, Arg("X or Y")], partials: Annotated[list[str], In("every gradient shard of the batch")],
                     reduced: Annotated[str, Out("the whole-batch gradient, results/gradients/<kind>.safetensors")]) -> None:
    """The whole-batch X or Y from its shards: their sum over the normalizer of the whole batch
    (X: ΣT or N; Y: the loss type's normalizer, the shards' shares summed)."""
    read = shards.read_set(partials, {"kind": kind}, agree=SHARED_KEYS)
    total, stats, normalizer = gradients.reduce_shards(kind, [(gradients.unpack(t), m)
                                                              for t, m in zip(read.tensors, read.metas)])
    header = {k: v for k, v in read.metas[0].items() if k not in PER_SHARD_KEYS}
    if any("tokens_outside_recomputed_nucleus" in m for m in read.metas):
        header["tokens_outside_recomputed_nucleus"] = sum(m.get("tokens_outside_recomputed_nucleus", 0)
                                                          for m in read.metas)
    shards.write_shard(reduced, gradients.pack(total, stats, kind), header | {
        "normalizer": normalizer, "num_shards": len(read),
        "job_costs": [m.get("cost") for m in read.metas]})  # the gradient shards are temporary: their cost lives on here
    log.info("%s = Σ of %d shards / %.6g; |%s| = %.6g", kind, len(read), normalizer, kind,
             gradients.global_norm(total))
