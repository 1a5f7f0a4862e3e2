"""Stage: the sampler's own entropy change ΔH_sampler(η) = H(θ + ηv) − H̄(θ) from the coupled
fresh rollouts of every E shard (DESIGN §2b), with its paired SE, how many responses changed and
what the coupling saved against independent draws, per η.

By hand:  python scripts/delta_h_sampler.py CONFIG.yaml OUT.json FRESH_SHARD...
"""
import logging

from entropy_probe import fresh, shards
from entropy_probe.stage import run_stage


def main(cfg: dict, shard_paths: list[str], out_path: str) -> None:
    est, G = cfg["estimator"], cfg["batch_config"]["G"]
    rows, fingerprint = fresh.reduce_shards([shards.read_shard(p, {"kind": "fresh"}) for p in shard_paths],
                                            est["fresh_etas"], G, est["normalization"], est["entropy"])
    for row in rows:
        logging.getLogger("delta_h_sampler").info(
            "eta %.4g: ΔH_sampler = %.6g ± %.3g; %d of %d responses changed; coupling: SE %.3gx smaller than with "
            "independent noise", row["eta"], row["delta_h"], row["se"], row["changed_responses"], row["num_sequences"],
            row["coupling_se_factor"] or float("nan"))
    shards.write_json(out_path, {"normalization": est["normalization"], "entropy": est["entropy"],
                                 "model_fingerprint": fingerprint, "rows": rows})


run_stage(globals(), main, ["out_path", ("shard_paths", "fresh-rollout shards", {"nargs": "+"})],
          lambda smk: {"shard_paths": list(smk.input), "out_path": smk.output[0]}, stage="delta_h_sampler")
