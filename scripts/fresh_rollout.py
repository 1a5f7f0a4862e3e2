"""Stage: one E shard redrawn at θ' = θ + ηv with the same sampling noise, under θ''s own
sampler (coupled fresh rollouts, DESIGN §2b): the responses, both per-prefix entropies at sampling
time, which responses changed, and the shard's per-response sums at θ for the paired reduction.

By hand:  python scripts/fresh_rollout.py CONFIG.yaml ROLLOUT_E_SHARD.safetensors PLAN_E.json POLICY_DIR \\
              V.safetensors ETA SHARD_INDEX OUT.safetensors
"""
import argparse
import logging


from entropy_probe import fresh, guards, noise, shards, stage_inputs
from entropy_probe.plan import shard_slots
from entropy_probe.stage import config_for, rule_config, stage_run

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


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        inputs, wildcards = snakemake.input, snakemake.wildcards  # noqa: F821
        main(rule_config(snakemake), inputs.rollout, inputs.plan, inputs.policy, inputs.v,  # noqa: F821
             float(wildcards.eta), int(wildcards.shard), snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("rollout")
    parser.add_argument("plan")
    parser.add_argument("policy_dir")
    parser.add_argument("v")
    parser.add_argument("eta", type=float)
    parser.add_argument("shard", type=int)
    parser.add_argument("out")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "fresh_rollout"), args.rollout, args.plan, args.policy_dir, args.v, args.eta,
             args.shard, args.out)
