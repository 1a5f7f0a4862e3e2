"""Stage: per-sequence importance log-weights and shifted entropies of one E shard at every
θ' = θ + ηv of the sweep (θ's nucleus kept), for the SNIS estimate of ΔH(η). The sweep is
estimator.eta_list plus the η of the trainer's step when v records one (a trainer checkpoint).

By hand:  python scripts/snis_shard.py CONFIG.yaml ROLLOUT.safetensors POLICY_DIR V.safetensors OUT.safetensors
"""
import logging

import torch

from entropy_probe import guards, shards, snis, stage_inputs
from entropy_probe.config import sweep_etas
from entropy_probe.stage import run_stage


def main(cfg: dict, rollout_path: str, policy_dir: str, v_path: str, out_path: str) -> None:
    gen = cfg["generation"]
    model, tokenizer, fingerprint = stage_inputs.load_policy(cfg, policy_dir)
    [rollout] = stage_inputs.read_rollouts([rollout_path], cfg, "E", fingerprint)
    v, v_meta = shards.read_shard(v_path, {"kind": "v", "model_fingerprint": fingerprint})
    etas = sweep_etas(cfg["estimator"], v_meta.get("training_eta"))
    out = snis.snis_pass(model, v, rollout, etas, pad_token_id=tokenizer.pad_token_id,
                         temperature=gen["temperature"], top_p=gen["top_p"], tf_batch_size=gen["tf_batch_size"],
                         chunk_tokens=gen["tf_chunk_tokens"], autocast_dtype=cfg["model"]["precision"])
    for name in ("log_w", "S_shifted"):
        guards.check_sequences(out[name].T, f"SNIS {name}", rollout_path)
    out["etas"] = torch.tensor(etas, dtype=torch.float64)
    shards.write_shard(out_path, out, {"kind": "snis", "model_fingerprint": fingerprint, "etas": etas,
                                       "precision": cfg["model"]["precision"]})
    logging.getLogger("snis_shard").info("wrote %s: %d sequences x %d etas", out_path, out["S"].numel(), len(etas))


run_stage(globals(), main, ["rollout_path", "policy_dir", "v_path", "out_path"],
          lambda smk: {"rollout_path": smk.input.rollout, "policy_dir": smk.input.policy, "v_path": smk.input.v,
                       "out_path": smk.output[0]}, stage="snis_shard")
