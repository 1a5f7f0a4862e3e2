"""Stage (embedded tiny policy only): the exact H, ∇H·v and ΔH(η) by enumerating every response
of every prompt of the dataset — the ground truth drawn on the report's plot — for the per-prefix
entropy of estimator.entropy. Two ΔH(η): ``exact_delta_h`` keeps θ's nucleus at every position
(the quantity SNIS estimates and δH₁ is checked against); ``exact_delta_h_sampler`` uses θ + ηv's
own nucleus (the sampler's own change, what the fresh rollouts estimate). Both at every η of the
SNIS sweep and of estimator.fresh_etas.

The prompts are the E batch's prepared prompt set (results/data/<E split>.json names it).

By hand:  python scripts/exact_reference.py CONFIG.yaml POLICY_DIR V.safetensors PREPARED_E.json OUT.json
"""
import logging

import torch

from entropy_probe import data, exact, models, shards
from entropy_probe.config import sweep_etas
from entropy_probe.stage import run_stage


def main(cfg: dict, policy_dir: str, v_path: str, prepared_path: str, out_path: str) -> None:
    gen, est = cfg["generation"], cfg["estimator"]
    # On the CPU whatever model.device says: the policy is the embedded tiny one (this rule exists
    # only for it), and on a cluster this small job runs on a CPU node.
    model = models.load_policy(policy_dir, cfg["model"]["dtype"], "cpu")
    tokenizer = models.load_tokenizer(policy_dir)
    v, v_meta = shards.read_shard(v_path, {"kind": "v", "model_fingerprint": models.fingerprint(policy_dir)})
    e_set = shards.read_json(prepared_path)
    examples = data.load_prepared(e_set["file"], e_set["sha256"])
    prompts = [e["prompt"] for e in examples]
    kwargs = dict(temperature=gen["temperature"], top_p=gen["top_p"], max_new_tokens=gen["max_new_tokens"],
                  normalization=est["normalization"], entropy=est["entropy"])
    H, grad = exact.exact_entropy_and_grad(model, tokenizer, prompts, **kwargs)
    grad_dot_v = exact.dot(grad, v)
    etas = sorted(set(sweep_etas(est, v_meta.get("training_eta"))) | set(est["fresh_etas"]))
    with torch.no_grad():
        H_at = {(eta, nucleus): exact.exact_entropy_at(model, tokenizer, prompts, direction=v, eta=eta,
                                                       nucleus=nucleus, **kwargs)
                for eta in [0.0, *etas] for nucleus in (("base", "own") if gen["top_p"] < 1.0 and eta else ("base",))}
    base = H_at[(0.0, "base")]
    own = {eta: H_at.get((eta, "own"), H_at[(eta, "base")]) for eta in etas}  # top_p = 1 or η = 0: one nucleus
    result = {"H": H, "grad_H_dot_v": grad_dot_v, "num_prompts": len(prompts), "entropy": est["entropy"],
              "delta_h": [{"eta": eta, "exact_delta_h": H_at[(eta, "base")] - base,
                           "exact_delta_h_sampler": own[eta] - base, "exact_delta_h1": eta * grad_dot_v}
                          for eta in etas if eta != 0.0]}
    shards.write_json(out_path, result)
    logging.getLogger("exact_reference").info("exact H = %.6g, ∇H·v = %.6g over %d prompts", H, grad_dot_v, len(prompts))


run_stage(globals(), main, ["policy_dir", "v_path", ("prepared_path", "results/data/<E split>.json: the E prompt set"),
                            "out_path"],
          lambda smk: {"policy_dir": smk.input.policy, "v_path": smk.input.v, "prepared_path": smk.input.data,
                       "out_path": smk.output[0]}, stage="exact_reference")
