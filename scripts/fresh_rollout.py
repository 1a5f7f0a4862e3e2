"""Stage: one E shard redrawn at θ' = θ + ηv with the same sampling noise, under θ''s own
sampler (coupled fresh rollouts, DESIGN §2b): the responses, both per-prefix entropies at sampling
time, which responses changed, and the shard's per-response sums at θ for the paired reduction.

By hand:  python scripts/fresh_rollout.py CONFIG.yaml ROLLOUT_E_SHARD.safetensors PLAN_E.json POLICY_DIR \\
              V.safetensors ETA SHARD_INDEX OUT.safetensors
"""
import logging

from entropy_probe import fresh, guards, noise, shards, stage_inputs
from entropy_probe.plan import shard_slots
from entropy_probe.stage import run_stage

log = logging.getLogger("fresh_rollout")


def main(cfg: dict, rollout_path: str, plan_path: str, policy_dir: str, v_path: str, eta: float, shard_index: int,
         out_path: str) -> None:
    gen, batch = cfg["generation"], cfg["batch_config"]
    model, tokenizer, fingerprint = stage_inputs.load_policy(cfg, policy_dir)
    [rollout] = stage_inputs.read_rollouts([rollout_path], cfg, "E", fingerprint)
    plan = shards.read_json(plan_path)
    if plan.get("kind") != "E" or list(plan["shards"][shard_index]) != rollout["prompt_ids"].tolist():
        raise shards.ShardError(f"{rollout_path}: its prompts are not shard {shard_index} of the E plan {plan_path}")
    v, _ = shards.read_shard(v_path, {"kind": "v", "model_fingerprint": fingerprint})
    out = fresh.fresh_rollout_shard(
        model, tokenizer, rollout, v, eta, slots=shard_slots(plan, shard_index), seed=batch["seed"],
        temperature=gen["temperature"], top_p=gen["top_p"], max_new_tokens=gen["max_new_tokens"],
        gen_batch_size=gen["gen_batch_size"], stop_strings=gen["stop_strings"],
        autocast_dtype=cfg["model"]["precision"], kv_cache=gen["kv_cache"],
    )
    B, G, T = out["rb_entropies"].shape
    for name in ("token_log_q", "rb_entropies", "tempered_entropies"):
        guards.check_sequences(out[name].reshape(B * G, T), f"fresh-rollout {name}", rollout_path)
    meta = stage_inputs.rollout_expectations(cfg, "E", fingerprint) | {
        "kind": "fresh", "eta": eta, "shard_index": shard_index, "num_shards": len(plan["shards"]),
        "noise": {"sampler": "gumbel-max", "generator": noise.GENERATOR, "stream": noise.STREAM_E},
    }
    shards.write_shard(out_path, out, meta)
    changed = out["changed"]
    log.info("wrote %s: η = %g, %d of %d responses changed (%d of %d prompt groups); mean RB entropy %.5f -> %.5f",
             out_path, eta, int(changed.sum()), changed.numel(), int(changed.any(-1).sum()), B,
             float(out["base_S"].sum() / out["base_T"].sum()),
             float(out["rb_entropies"].double().sum() / out["response_lens"].sum()))


run_stage(globals(), main, ["rollout_path", "plan_path", "policy_dir", "v_path", ("eta", None, {"type": float}),
                            ("shard_index", None, {"type": int}), "out_path"],
          lambda smk: {"rollout_path": smk.input.rollout, "plan_path": smk.input.plan, "policy_dir": smk.input.policy,
                       "v_path": smk.input.v, "eta": float(smk.wildcards.eta), "shard_index": int(smk.wildcards.shard),
                       "out_path": smk.output[0]}, stage="fresh_rollout")
