"""Stage: one teacher-forcing gradient shard. X: the entropy-gradient surrogate on an E shard;
Y: the GRPO objective on a U shard. Unnormalized sums; the reduction divides.

By hand:  python scripts/teacher_force.py CONFIG.yaml {X,Y} ROLLOUT.safetensors POLICY_DIR OUT.safetensors [--stats E_STATS.json]
"""
import argparse
import logging

from entropy_probe import gradients, guards, passes, probe
from entropy_probe.config import load_config
from entropy_probe.shards import read_json, write_shard
from entropy_probe.stage import stage_run

log = logging.getLogger("teacher_force")


def main(cfg: dict, kind: str, rollout_path: str, policy_dir: str, out_path: str, stats_path: str | None) -> None:
    gen, est = cfg["generation"], cfg["estimator"]
    model, tokenizer, params, fingerprint = probe.load_for_teacher_forcing(cfg, policy_dir)
    rollout_kind = "E" if kind == "X" else "U"
    [rollout] = probe.read_rollouts([rollout_path], cfg, rollout_kind, fingerprint)
    common = dict(pad_token_id=tokenizer.pad_token_id, temperature=gen["temperature"], tf_batch_size=gen["tf_batch_size"],
                  chunk_tokens=gen["tf_chunk_tokens"], autocast_dtype=gen["autocast_dtype"])
    meta = {"kind": kind, "model_fingerprint": fingerprint, "param_filter": est["param_filter"]}
    if kind == "X":
        H_bar = read_json(stats_path)["H_bar_token"]
        grads, stats = passes.x_gradient(
            model, params, rollout, top_p=gen["top_p"], H_bar=H_bar, normalization=est["normalization"],
            baseline=est["baseline"], rb_requires_grad=gen["rb_requires_grad"], **common,
        )
        meta |= {"H_bar": H_bar, "normalization": est["normalization"], "baseline": est["baseline"],
                 "rb_requires_grad": gen["rb_requires_grad"]}
    else:
        loss_norm = cfg["update"]["loss_normalization"]
        settings = {key: cfg["update"][key] for key in ("max_completion_length", "loss_scale_factor") if key in cfg["update"]}
        grads, share = passes.y_gradient(model, params, rollout, normalization=loss_norm, loss_settings=settings, **common)
        stats, meta = {}, meta | {"loss_normalization": loss_norm, "normalizer_share": share}
    guards.check_parameters(grads, f"{kind} gradient", rollout_path)
    for name, values in stats.items():
        guards.check_sequences(values, f"teacher-forced {name}", rollout_path)
    write_shard(out_path, gradients.pack(grads, stats), meta)
    log.info("wrote %s: %d tensors, |grad sum| = %.4g", out_path, len(grads), gradients.global_norm(grads))


if "snakemake" in globals():
    with stage_run(snakemake.log[0]):  # noqa: F821
        main(snakemake.params.cfg, snakemake.wildcards.kind, snakemake.input.rollout, snakemake.input.policy,  # noqa: F821
             snakemake.output[0], snakemake.input.get("stats"))  # noqa: F821
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("kind", choices=["X", "Y"])
    parser.add_argument("rollout")
    parser.add_argument("policy_dir")
    parser.add_argument("out")
    parser.add_argument("--stats", help="E batch statistics JSON (required for X)")
    args = parser.parse_args()
    if args.kind == "X" and not args.stats:
        parser.error("X needs --stats (the e_stats stage's JSON)")
    with stage_run():
        main(load_config(args.config), args.kind, args.rollout, args.policy_dir, args.out, args.stats)
