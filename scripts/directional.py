"""Stage: per-prompt-group directional derivatives of the X surrogate along v on one E shard
(forward-mode AD); they give δH₁ per group, hence its standard error. The shard also keeps the
per-token derivatives (token/…), from which the attribution stage splits X·v over E tokens.

By hand:  python scripts/directional.py CONFIG.yaml ROLLOUT.safetensors POLICY_DIR V.safetensors OUT.safetensors
"""
import logging

from entropy_probe import guards, passes, shards, stage_inputs
from entropy_probe.stage import run_stage


def main(cfg: dict, rollout_path: str, policy_dir: str, v_path: str, out_path: str) -> None:
    gen, est = cfg["generation"], cfg["estimator"]
    model, tokenizer, _, fingerprint = stage_inputs.load_for_teacher_forcing(cfg, policy_dir)
    [rollout] = stage_inputs.read_rollouts([rollout_path], cfg, "E", fingerprint)
    v, _ = shards.read_shard(v_path, {"kind": "v", "model_fingerprint": fingerprint})
    tokens = passes.directional_tokens(
        model, v, rollout, pad_token_id=tokenizer.pad_token_id, temperature=gen["temperature"], top_p=gen["top_p"],
        normalization=est["normalization"], baseline=est["baseline"], rb_requires_grad=gen["rb_requires_grad"],
        tf_batch_size=gen["tf_batch_size"], chunk_tokens=gen["tf_chunk_tokens"], entropy=est["entropy"],
        autocast_dtype=cfg["model"]["precision"],
    )
    sums = passes.sums_of_tokens(tokens, rollout["response_lens"])
    for name, values in sums.items():
        guards.check_sequences(values, f"directional sum {name} (per prompt group)", rollout_path)
    per_token = {f"{passes.TOKEN_PREFIX}{name}": values for name, values in tokens.items() if name != "outside_nucleus"}
    shards.write_shard(out_path, sums | per_token, {"kind": "directional", "model_fingerprint": fingerprint,
                                                    "normalization": est["normalization"],
                                                    "baseline": est["baseline"], "entropy": est["entropy"],
                                                    "precision": cfg["model"]["precision"]})
    logging.getLogger("directional").info("wrote %s: %d prompt groups", out_path, sums["P"].numel())


run_stage(globals(), main, ["rollout_path", "policy_dir", "v_path", "out_path"],
          lambda smk: {"rollout_path": smk.input.rollout, "policy_dir": smk.input.policy, "v_path": smk.input.v,
                       "out_path": smk.output[0]}, stage="directional")
