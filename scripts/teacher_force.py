"""Stage: one teacher-forcing gradient shard. X: the entropy-gradient surrogate on an E shard
(with the whole-E-batch plug-ins of e_stats); Y: the GRPO objective on a U shard (with the
whole-U-batch coefficients of u_objective). Unnormalized sums; the reduction divides.

By hand:  python scripts/teacher_force.py CONFIG.yaml X ROLLOUT.safetensors POLICY_DIR OUT.safetensors --stats E_STATS.json
          python scripts/teacher_force.py CONFIG.yaml Y ROLLOUT.safetensors POLICY_DIR OUT.safetensors --objective U_OBJECTIVE.safetensors
"""
import argparse
import logging

from entropy_probe import gradients, guards, passes, stage_inputs
from entropy_probe.shards import ShardError, read_json, read_shard, write_shard
from entropy_probe.stage import config_for, rule_config, stage_run

log = logging.getLogger("teacher_force")


def main(cfg: dict, kind: str, rollout_path: str, policy_dir: str, out_path: str, batch_input: str) -> None:
    gen, est = cfg["generation"], cfg["estimator"]
    model, tokenizer, params, fingerprint = stage_inputs.load_for_teacher_forcing(cfg, policy_dir)
    rollout_kind = "E" if kind == "X" else "U"
    [rollout] = stage_inputs.read_rollouts([rollout_path], cfg, rollout_kind, fingerprint)
    common = dict(pad_token_id=tokenizer.pad_token_id, temperature=gen["temperature"], tf_batch_size=gen["tf_batch_size"],
                  chunk_tokens=gen["tf_chunk_tokens"], autocast_dtype=gen["autocast_dtype"])
    meta = {"kind": kind, "model_fingerprint": fingerprint, "param_filter": est["param_filter"]}
    if kind == "X":
        e_stats = read_json(batch_input)
        if e_stats.get("entropy") != est["entropy"]:
            raise ShardError(f"{batch_input}: plug-ins of the {e_stats.get('entropy')!r} entropy, expected "
                             f"{est['entropy']!r} (estimator.entropy)")
        H_bar = e_stats["H_bar_token"]
        grads, stats = passes.x_gradient(
            model, params, rollout, top_p=gen["top_p"], H_bar=H_bar, normalization=est["normalization"],
            baseline=est["baseline"], rb_requires_grad=gen["rb_requires_grad"], entropy=est["entropy"], **common,
        )
        meta |= {"H_bar": H_bar, "normalization": est["normalization"], "baseline": est["baseline"],
                 "rb_requires_grad": gen["rb_requires_grad"], "entropy": est["entropy"]}
    else:
        objective, objective_meta = read_shard(batch_input, {"kind": "u_objective", "model_fingerprint": fingerprint})
        rows = stage_inputs.rows_of_shard(objective, rollout, batch_input)
        grads = passes.y_gradient(model, params, rollout, objective["coefficients"][rows], **common)
        stats = {}
        meta |= {"loss_type": objective_meta["loss_type"],
                 "normalizer_share": float(objective["normalizer_terms"][rows].sum())}
    guards.check_parameters(grads, f"{kind} gradient", rollout_path)
    for name, values in stats.items():
        guards.check_sequences(values, f"teacher-forced {name}", rollout_path)
    write_shard(out_path, gradients.pack(grads, stats), meta)
    log.info("wrote %s: %d tensors, |grad sum| = %.4g", out_path, len(grads), gradients.global_norm(grads))


if "snakemake" in globals():
    with stage_run(snakemake.log[0], snakemake.threads):  # noqa: F821
        main(rule_config(snakemake), snakemake.wildcards.kind, snakemake.input.rollout, snakemake.input.policy,  # noqa: F821
             snakemake.output[0], snakemake.input.batch)  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("kind", choices=["X", "Y"])
    parser.add_argument("rollout")
    parser.add_argument("policy_dir")
    parser.add_argument("out")
    parser.add_argument("--stats", help="E batch statistics JSON (e_stats; required for X)")
    parser.add_argument("--objective", help="the U batch's objective weights (u_objective; required for Y)")
    args = parser.parse_args()
    needed = args.stats if args.kind == "X" else args.objective
    if not needed:
        parser.error("X needs --stats (the e_stats stage's JSON); Y needs --objective (the u_objective stage's file)")
    with stage_run():
        main(config_for(args.config, f"teacher_force_{args.kind.lower()}"), args.kind, args.rollout, args.policy_dir,
             args.out, needed)
