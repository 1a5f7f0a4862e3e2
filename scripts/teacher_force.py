"""Stage: one teacher-forcing gradient shard. X: the entropy-gradient surrogate on an E shard
(with the whole-E-batch plug-ins of e_stats); Y: the GRPO objective on a U shard (with the
whole-U-batch coefficients of u_objective). Unnormalized sums; the reduction divides.

By hand:  python scripts/teacher_force.py CONFIG.yaml X ROLLOUT.safetensors POLICY_DIR OUT.safetensors E_STATS.json
          python scripts/teacher_force.py CONFIG.yaml Y ROLLOUT.safetensors POLICY_DIR OUT.safetensors U_OBJECTIVE.safetensors
"""
import logging

from entropy_probe import gradients, guards, passes, stage_inputs
from entropy_probe.shards import ShardError, read_json, read_shard, write_shard
from entropy_probe.stage import run_stage

log = logging.getLogger("teacher_force")


def main(cfg: dict, kind: str, rollout_path: str, policy_dir: str, out_path: str, batch_input: str) -> None:
    gen, est = cfg["generation"], cfg["estimator"]
    model, tokenizer, params, fingerprint = stage_inputs.load_for_teacher_forcing(cfg, policy_dir)
    rollout_kind = "E" if kind == "X" else "U"
    [rollout] = stage_inputs.read_rollouts([rollout_path], cfg, rollout_kind, fingerprint)
    common = dict(pad_token_id=tokenizer.pad_token_id, temperature=gen["temperature"], tf_batch_size=gen["tf_batch_size"],
                  chunk_tokens=gen["tf_chunk_tokens"], autocast_dtype=cfg["model"]["precision"])
    meta = {"kind": kind, "model_fingerprint": fingerprint, "param_filter": est["param_filter"],
            "precision": cfg["model"]["precision"]}
    if kind == "X":
        e_stats = read_json(batch_input)
        if e_stats.get("entropy") != est["entropy"]:
            raise ShardError(f"{batch_input}: plug-ins of the {e_stats.get('entropy')!r} entropy, expected "
                             f"{est['entropy']!r} (estimator.entropy)")
        H_bar = e_stats["H_bar_token"]
        grads, stats = passes.x_gradient(
            model, params, rollout, top_p=gen["top_p"], H_bar=H_bar, normalization=est["normalization"],
            baseline=est["baseline"], rb_requires_grad=gen["rb_requires_grad"], entropy=est["entropy"],
            gradient_checkpointing=gen["gradient_checkpointing"], **common,
        )
        meta |= {"H_bar": H_bar, "normalization": est["normalization"], "baseline": est["baseline"],
                 "rb_requires_grad": gen["rb_requires_grad"], "entropy": est["entropy"]}
    else:
        objective, objective_meta = read_shard(batch_input, {"kind": "u_objective", "model_fingerprint": fingerprint})
        rows = stage_inputs.rows_of_shard(objective, rollout, batch_input)
        grads = passes.y_gradient(model, params, rollout, objective["coefficients"][rows],
                                  gradient_checkpointing=gen["gradient_checkpointing"], **common)
        stats = {}
        meta |= {"loss_type": objective_meta["loss_type"],
                 "normalizer_share": float(objective["normalizer_terms"][rows].sum())}
    if "outside_nucleus" in stats:
        meta["tokens_outside_recomputed_nucleus"] = int(stats["outside_nucleus"].sum())
    guards.check_parameters(grads, f"{kind} gradient", rollout_path)
    for name, values in stats.items():
        guards.check_sequences(values, f"teacher-forced {name}", rollout_path)
    write_shard(out_path, gradients.pack(grads, stats, kind), meta)
    log.info("wrote %s: %d tensors, |grad sum| = %.4g", out_path, len(grads), gradients.global_norm(grads))


run_stage(globals(), main, [("kind", "X or Y", {"choices": ["X", "Y"]}), "rollout_path", "policy_dir", "out_path",
                            ("batch_input", "X: the E batch's e_stats JSON; Y: the U batch's u_objective file")],
          lambda smk: {"kind": smk.wildcards.kind, "rollout_path": smk.input.rollout, "policy_dir": smk.input.policy,
                       "out_path": smk.output[0], "batch_input": smk.input.batch},
          stage=lambda args: f"teacher_force_{args['kind'].lower()}")
