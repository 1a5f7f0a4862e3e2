"""G responses per prompt from the sampling measure q, one job per shard of each batch."""
from __future__ import annotations

from typing import Annotated

import logging

from .. import job_cost, losses, models, noise, prompts, rewards, shards, stopping
from ..plan import shard_slots
from ..rollout import check_shapes, rollout_shard
from ..stage import Arg, In, Out, config_hash
from ..stage_keys import defining_values
from .inputs import rollout_header

log = logging.getLogger(__name__)


def rollout(cfg: dict, *, plan: Annotated[str, In("the batch's plan, results/plan/<kind>.json")],
            policy: Annotated[str, In("the policy directory or spec")], kind: Annotated[str, Arg("the batch: E or U")],
            shard: Annotated[int, Arg("the shard's index in the plan")],
            rollouts: Annotated[str, Out("the shard, results/rollouts/<kind>/shard_<shard>.safetensors")]) -> None:
    """One rollout shard: G responses per prompt of the plan's shard, drawn from q with the noise
    of each response's slot, with their rewards. The prompts are those of the prepared prompt
    file the plan names (checked by hash). Advantages are not stored: the U objective computes
    them from the rewards (a change of update.scale_rewards or of the loss regenerates nothing)."""
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
    tensors = rollout_shard(
        model, tokenizer, examples, prompt_ids, G=batch["G"], kind=kind, shard_index=shard,
        slots=slots, seed=batch["seed"], temperature=gen["temperature"], top_p=gen["top_p"],
        max_new_tokens=gen["max_new_tokens"], rollout_batch_size=gen["rollout_batch_size"],
        gen_batch_size=gen["gen_batch_size"], reward_fn=reward_fn, stop_strings=gen["stop_strings"],
        autocast_dtype=cfg["model"]["precision"], kv_cache=gen["kv_cache"],
    )
    B, G, L = check_shapes(tensors)
    header = rollout_header(cfg, kind, models.fingerprint(policy)) | {
        "shard_index": shard, "num_shards": len(drawn["shards"]),
        "noise": {"sampler": "gumbel-max", "generator": noise.GENERATOR, "stream": noise.STREAMS[kind],
                  "first_slot": slots[0] if slots else 0}, "prompt_width": L - tensors["token_log_q"].shape[-1],
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "stop_strings": list(gen["stop_strings"]),
        "stop_reasons": {str(k): v for k, v in stopping.STOP_REASONS.items()},
        "reward": {"name": cfg["reward"]["name"], "codes": rewards.legend()},
        "data": {"split": source["split"], "file": source["file"], "sha256": source["sha256"]},
        "config_hash": config_hash(defining_values(cfg, "rollout")),
    }
    header["cost"] = cost = job_cost.record(generated=int(tensors["response_lens"].sum()),
                                            forward=job_cost.sequence_tokens(tensors))
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


def _counts(codes, legend: dict) -> str:
    return ", ".join(f"{name} {int((codes == code).sum())}" for code, name in legend.items() if (codes == code).any())
