"""Stage: per-prompt-group directional derivatives of the X surrogate along v on one E shard
(forward-mode AD); they give δH₁ per group, hence its standard error.

By hand:  python scripts/directional.py CONFIG.yaml ROLLOUT.safetensors POLICY_DIR V.safetensors OUT.safetensors
"""
import argparse
import logging

from entropy_probe import guards, passes, shards, stage_inputs
from entropy_probe.stage import config_for, rule_config, stage_run


def main(cfg: dict, rollout_path: str, policy_dir: str, v_path: str, out_path: str) -> None:
    gen, est = cfg["generation"], cfg["estimator"]
    model, tokenizer, _, fingerprint = stage_inputs.load_for_teacher_forcing(cfg, policy_dir)
    [rollout] = stage_inputs.read_rollouts([rollout_path], cfg, "E", fingerprint)
    v, _ = shards.read_shard(v_path, {"kind": "v", "model_fingerprint": fingerprint})
    sums = passes.directional_sums(
        model, v, rollout, pad_token_id=tokenizer.pad_token_id, temperature=gen["temperature"], top_p=gen["top_p"],
        normalization=est["normalization"], baseline=est["baseline"], rb_requires_grad=gen["rb_requires_grad"],
        tf_batch_size=gen["tf_batch_size"], chunk_tokens=gen["tf_chunk_tokens"], entropy=est["entropy"],
    )
    for name, values in sums.items():
        guards.check_sequences(values, f"directional sum {name} (per prompt group)", rollout_path)
    shards.write_shard(out_path, sums, {"kind": "directional", "model_fingerprint": fingerprint,
                                        "normalization": est["normalization"], "baseline": est["baseline"],
                                        "entropy": est["entropy"]})
    logging.getLogger("directional").info("wrote %s: %d prompt groups", out_path, sums["P"].numel())


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        main(rule_config(snakemake), snakemake.input.rollout, snakemake.input.policy, snakemake.input.v,  # noqa: F821
             snakemake.output[0])  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("rollout")
    parser.add_argument("policy_dir")
    parser.add_argument("v")
    parser.add_argument("out")
    args = parser.parse_args()
    with stage_run():
        main(config_for(args.config, "directional"), args.rollout, args.policy_dir, args.v, args.out)
