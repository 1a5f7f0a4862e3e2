"""G responses per prompt from the sampling measure q, one job per shard of each batch."""
from __future__ import annotations

from typing import Annotated

import logging

from .. import fresh_pass, job_cost, losses, models, noise, prompts, rewards, shards, stopping
from ..plan import shard_slots
from ..rollout import check_shapes, rollout_shard
from ..stage import Arg, In, Out, config_hash
from ..stage_keys import defining_values
from .inputs import rollout_header

log = logging.getLogger(__name__)


def rollout(cfg: dict, *, plan: Annotated[str, In("the batch's plan, results/plan/<kind>.json")],
            policy: Annotated[str, In("the policy directory or spec")], kind: Annotated[str, Arg("the batch: E or U")],
            shard: Annotated[int, Arg("the shard's index in the plan")],
            rollouts: Annotated[str, Out("the shard, results/rollouts/<kind>/shard_<shard>.safetensors")],
            previous: Annotated[str, In("in a trajectory, the same E shard at the checkpoint before: redrawn from it "
                                        "by verification")] = None) -> None:
    """One rollout shard: G responses per prompt of the plan's shard, drawn from q with the noise
    of each response's slot, with their rewards. The prompts are those of the prepared prompt
    file the plan names (checked by hash). Advantages are not stored: the U objective computes
    them from the rewards (a change of update.scale_rewards or of the loss regenerates nothing).

    With ``previous`` (an E shard of the same slots and noise drawn at the trainer's checkpoint
    before this one, generation.fresh_rollouts: verification) the shard is drawn from it by
    verification (:func:`entropy_probe.fresh_pass.verified_rollout_shard`): the same responses,
    at the cost of one teacher-forced pass plus what changed."""
    batch, gen = cfg["batch_config"], cfg["generation"]
    drawn = shards.read_json(plan)
    if drawn.get("kind") != kind:
        raise shards.ShardError(f"{plan}: the plan of batch {drawn.get('kind')!r}, expected {kind!r}")
    prompt_ids = drawn["shards"][shard]
    slots = shard_slots(drawn, shard)  # keys of the sampling noise: independent of the shard layout
    source = drawn["data"]
    examples = prompts.load_prepared(source["file"], source["sha256"])
    reward_fn = rewards.from_config(cfg["reward"])
    tokenizer = models.load_tokenizer(policy)
    model = models.load_policy(policy, cfg["model"]["dtype"], cfg["model"]["device"])
    log.info("%s shard %d: %d prompts x G=%d on %s", kind, shard, len(prompt_ids), batch["G"], model.device)
    fingerprint = models.fingerprint(policy)
    if previous:
        tensors, counts, drawn_by = _verified(cfg, model, tokenizer, examples, previous, kind, prompt_ids, slots,
                                              reward_fn, fingerprint)
        cost = job_cost.record(generated=counts["generated_tokens"], forward=counts["forward_tokens"],
                               method="verification", teacher_forced_tokens=counts["teacher_forced_tokens"],
                               regeneration_tokens=counts["regeneration_tokens"])
    else:
        tensors = rollout_shard(
            model, tokenizer, examples, prompt_ids, G=batch["G"], kind=kind, shard_index=shard,
            slots=slots, seed=batch["seed"], temperature=gen["temperature"], top_p=gen["top_p"],
            max_new_tokens=gen["max_new_tokens"], rollout_batch_size=gen["rollout_batch_size"],
            gen_batch_size=gen["gen_batch_size"], reward_fn=reward_fn, stop_strings=gen["stop_strings"],
            autocast_dtype=cfg["model"]["precision"], kv_cache=gen["kv_cache"],
        )
        drawn_by = {"method": "generation"}
        cost = job_cost.record(generated=int(tensors["response_lens"].sum()), forward=job_cost.sequence_tokens(tensors))
    B, G, L = check_shapes(tensors)
    header = rollout_header(cfg, kind, fingerprint) | {
        "shard_index": shard, "num_shards": len(drawn["shards"]),
        "noise": {"sampler": "gumbel-max", "generator": noise.GENERATOR, "stream": noise.STREAMS[kind],
                  "first_slot": slots[0] if slots else 0}, "prompt_width": L - tensors["token_log_q"].shape[-1],
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "stop_strings": list(gen["stop_strings"]),
        "stop_reasons": {str(k): v for k, v in stopping.STOP_REASONS.items()},
        "reward": {"name": cfg["reward"]["name"], "codes": rewards.legend()},
        "data": {"split": source["split"], "file": source["file"], "sha256": source["sha256"]},
        "config_hash": config_hash(defining_values(cfg, "rollout")),
        "drawn_by": drawn_by, "cost": cost,
    }
    shards.write_shard(rollouts, tensors, header)
    log.info(job_cost.describe(cost))
    lens = tensors["response_lens"].float()
    log.info(
        "wrote %s: sequences %s, mean reward %.3f, mean response length %.2f, EOS in %.0f%%, mean RB entropy %.4f",
        rollouts, tuple(tensors["sequences"].shape), tensors["rewards"].mean(), lens.mean(),
        100 * tensors["stopped_at_eos"].float().mean(), tensors["rb_entropies"].sum() / lens.sum(),
    )
    log.info("stop reasons: %s; reward outcomes: %s",
             _counts(tensors["stop_reason"], stopping.STOP_REASONS), _counts(tensors["reward_codes"], rewards.OUTCOMES))
    log.info("prompt groups with non-zero advantages (rewards not all equal): %d of %d",
             losses.informative_groups(tensors["rewards"]), B)


def _verified(cfg: dict, model, tokenizer, examples: list[dict], previous: str, kind: str, prompt_ids: list[int],
              slots: list[int], reward_fn, fingerprint: str) -> tuple[dict, dict, dict]:
    """(tensors, cost, provenance) of an E shard redrawn from ``previous`` by verification, after
    checking that ``previous`` holds the same prompts, drawn with the same sampler and noise."""
    gen, tf, batch = cfg["generation"], cfg["teacher_forcing"], cfg["batch_config"]
    if kind != "E":
        raise shards.ShardError(f"{previous}: only E shards are redrawn from a previous checkpoint's")
    expected = rollout_header(cfg, kind, fingerprint)
    drawn, meta = shards.read_shard(previous, {key: value for key, value in expected.items()
                                               if key not in ("model_fingerprint", "precision")})
    if drawn["prompt_ids"].tolist() != list(prompt_ids):
        raise shards.ShardError(f"{previous}: other prompts than this shard's plan: it cannot be redrawn by verification")
    tensors, counts = fresh_pass.verified_rollout_shard(
        model, tokenizer, drawn, examples, reward_fn=reward_fn, slots=slots, seed=batch["seed"],
        temperature=gen["temperature"], top_p=gen["top_p"], max_new_tokens=gen["max_new_tokens"],
        gen_batch_size=gen["gen_batch_size"], tf_batch_size=tf["batch_size"], chunk_tokens=tf["chunk_tokens"],
        stop_strings=gen["stop_strings"], autocast_dtype=cfg["model"]["precision"], kv_cache=gen["kv_cache"])
    changed = int((tensors["sequences"] != drawn["sequences"]).any(-1).sum())
    log.info("redrawn by verification from %s: %d of %d responses changed", previous, changed,
             tensors["response_lens"].numel())
    return tensors, counts, {"method": "verification", "from": previous, "from_model": meta["model_fingerprint"],
                             "changed_responses": changed}


def _counts(codes, legend: dict) -> str:
    return ", ".join(f"{name} {int((codes == code).sum())}" for code, name in legend.items() if (codes == code).any())
