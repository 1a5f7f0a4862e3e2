"""Stage: one rollout shard (E or U): G responses per prompt from the sampling measure q, with
their rewards. The prompts are those of the prepared prompt file the batch's plan names (checked
by hash). Advantages are not stored: the update stage computes them from the rewards (so a change
of batch_config.scale_rewards or of the loss type does not regenerate rollouts).

By hand:  python scripts/rollout.py CONFIG.yaml PLAN_KIND.json POLICY_DIR {E,U} SHARD_INDEX OUT.safetensors
"""
import logging

from entropy_probe import data, generate, losses, models, noise, rewards
from entropy_probe.plan import shard_slots
from entropy_probe.rollout import check_shapes, rollout_shard
from entropy_probe.shards import read_json, write_shard
from entropy_probe.stage import config_hash, run_stage
from entropy_probe.stage_keys import defining_values

log = logging.getLogger("rollout")


def main(cfg: dict, plan_path: str, policy_dir: str, kind: str, shard_index: int, out_path: str) -> None:
    batch, gen = cfg["batch_config"], cfg["generation"]
    plan = read_json(plan_path)
    if plan.get("kind") != kind:
        raise ValueError(f"{plan_path}: the plan of batch {plan.get('kind')!r}, expected {kind!r}")
    prompt_ids = plan["shards"][shard_index]
    slots = shard_slots(plan, shard_index)  # keys of the sampling noise: independent of the shard layout
    source = plan["data"]
    examples = data.load_prepared(source["file"], source["sha256"])
    reward_fn = rewards.from_config(cfg["reward"])
    tokenizer = models.load_tokenizer(policy_dir)
    model = models.load_policy(policy_dir, cfg["model"]["dtype"], cfg["model"]["device"])
    log.info("%s shard %d: %d prompts x G=%d on %s", kind, shard_index, len(prompt_ids), batch["G"], model.device)
    tensors = rollout_shard(
        model, tokenizer, examples, prompt_ids, G=batch["G"], kind=kind, shard_index=shard_index,
        slots=slots, seed=batch["seed"], temperature=gen["temperature"], top_p=gen["top_p"],
        max_new_tokens=gen["max_new_tokens"], rollout_batch_size=batch["rollout_batch_size"],
        gen_batch_size=gen["gen_batch_size"], reward_fn=reward_fn, stop_strings=gen["stop_strings"],
        autocast_dtype=cfg["model"]["precision"], kv_cache=gen["kv_cache"],
    )
    B, G, L = check_shapes(tensors)
    metadata = {
        "batch_kind": kind, "shard_index": shard_index, "num_shards": len(plan["shards"]),
        "seed": batch["seed"], "G": G,
        "noise": {"sampler": "gumbel-max", "generator": noise.GENERATOR, "stream": noise.STREAMS[kind],
                  "first_slot": slots[0] if slots else 0}, "prompt_width": L - tensors["token_log_q"].shape[-1],
        "model_fingerprint": models.fingerprint(policy_dir),
        "generation": {k: gen[k] for k in ("temperature", "top_p", "max_new_tokens")},
        "precision": cfg["model"]["precision"],
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "stop_strings": list(gen["stop_strings"]),
        "stop_reasons": {str(k): v for k, v in generate.STOP_REASONS.items()},
        "reward": {"name": cfg["reward"]["name"], "codes": rewards.legend()},
        "data": {"split": source["split"], "file": source["file"], "sha256": source["sha256"]},
        "config_hash": config_hash(defining_values(cfg, "rollout")),
    }
    write_shard(out_path, tensors, metadata)
    lens = tensors["response_lens"].float()
    log.info(
        "wrote %s: sequences %s, mean reward %.3f, mean response length %.2f, EOS in %.0f%%, mean RB entropy %.4f",
        out_path, tuple(tensors["sequences"].shape), tensors["rewards"].mean(), lens.mean(),
        100 * tensors["stopped_at_eos"].float().mean(), tensors["rb_entropies"].sum() / lens.sum(),
    )
    log.info("stop reasons: %s; reward outcomes: %s",
             _counts(tensors["stop_reason"], generate.STOP_REASONS), _counts(tensors["reward_codes"], rewards.OUTCOMES))
    log.info("prompt groups with non-zero advantages (rewards not all equal): %d of %d",
             losses.informative_groups(tensors["rewards"]), B)


def _counts(codes, legend: dict) -> str:
    return ", ".join(f"{name} {int((codes == code).sum())}" for code, name in legend.items() if (codes == code).any())


run_stage(globals(), main, [("plan_path", "results/plan/<kind>.json"), "policy_dir",
                            ("kind", "E or U", {"choices": ["E", "U"]}), ("shard_index", None, {"type": int}), "out_path"],
          lambda smk: {"plan_path": smk.input.plan, "policy_dir": smk.input.policy, "kind": smk.wildcards.kind,
                       "shard_index": int(smk.wildcards.shard), "out_path": smk.output[0]}, stage="rollout")
