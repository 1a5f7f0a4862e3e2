"""Stage: the GRPO objective's weights on the whole U batch — advantages from the rewards
(batch_config.scale_rewards) and each response's coefficient of Σ_k log p_ik under
update.loss_type (entropy_probe.losses) — and how many prompt groups carry a gradient at all.

With update.optimizer: sgd and no prompt group with a non-zero advantage, v = 0 and every later
stage would be wasted: the stage stops the run here, before any teacher forcing, saying so.

By hand:  python scripts/u_objective.py CONFIG.yaml POLICY OUT.safetensors U_SHARD... [--optimizer sgd]
"""
import logging

import torch

from entropy_probe import losses, models, shards, stage_inputs
from entropy_probe.stage import run_stage

log = logging.getLogger("u_objective")

def main(cfg: dict, policy: str, rollout_paths: list[str], out_path: str, optimizer: str | None) -> None:
    rollouts = stage_inputs.read_rollouts(rollout_paths, cfg, "U", models.fingerprint(policy))
    upd = cfg["update"]
    settings = losses.LossSettings(
        max_completion_length=upd["max_completion_length"] or cfg["generation"]["max_new_tokens"],
        loss_scale_factor=upd["loss_scale_factor"], micro_batch_size=upd["micro_batch_size"])
    rewards = torch.cat([r["rewards"] for r in rollouts])
    lengths = torch.cat([r["response_lens"] for r in rollouts])
    advantages = losses.group_advantages(rewards, cfg["batch_config"]["scale_rewards"])
    numerators, normalizer_terms = losses.response_weights(upd["loss_type"], advantages, lengths, settings)
    informative = losses.informative_groups(rewards)
    B = rewards.shape[0]
    log.info("U batch: %d of %d prompt groups have non-zero advantages; loss %s (%s), normalizer %.6g", informative,
             B, upd["loss_type"], losses.resolve(upd["loss_type"]).formula, float(normalizer_terms.sum()))
    if informative == 0 and optimizer == "sgd":
        raise losses.NoSignalError(
            f"no prompt group of the U batch ({B} groups of G = {rewards.shape[1]}) has a non-zero advantage (every "
            "group's rewards are equal), so with update.optimizer: sgd v = 0 and δH₁ = 0: stopped before teacher "
            "forcing. Raise batch_config.B_U or G, use a reward that separates responses, or use update.optimizer: "
            "adamw with the checkpoint's optimizer state")
    shard_index = torch.cat([torch.full((r["rewards"].shape[0],), i) for i, r in enumerate(rollouts)])
    tensors = {"advantages": advantages, "coefficients": numerators, "normalizer_terms": normalizer_terms,
               "prompt_ids": torch.cat([r["prompt_ids"] for r in rollouts]), "shard_index": shard_index}
    shards.write_shard(out_path, tensors, {
        "kind": "u_objective", "model_fingerprint": models.fingerprint(policy), "loss_type": upd["loss_type"],
        "loss_formula": losses.resolve(upd["loss_type"]).formula, "scale_rewards": cfg["batch_config"]["scale_rewards"],
        "informative_groups": informative, "num_groups": B})


# update.optimizer only decides whether a batch without signal is an error: read, not tracked.
# Never for an update variant's objective: a variant's v = 0 is its answer, the main update decides.
run_stage(globals(), main, ["policy", "out_path", ("rollout_paths", "U rollout shards", {"nargs": "+"}),
                            ("--optimizer", "update.optimizer (sgd: a batch without signal is an error)",
                             {"default": "sgd", "choices": ["sgd", "adamw"]})],
          lambda smk: {"policy": smk.input.policy, "rollout_paths": list(smk.input.rollouts), "out_path": smk.output[0],
                       "optimizer": None if smk.rule.startswith("variant_") else smk.config["update"]["optimizer"]},
          stage="u_objective")
