"""The model work of a run, counted from its config before it runs: per stage, its jobs, the
sequences it touches, the tokens it may generate and its passes over those sequences. Upper
bounds where lengths are unknown (every response at ``generation.max_new_tokens``); the measured
counterpart is each job's benchmark file and, for the fresh rollouts, their recorded cost.

Torch-free: docs/generate.py renders it for the README.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import variants as variant_rules


@dataclass
class StageWork:
    stage: str
    jobs: int
    sequences: int  # sequences per pass
    generated: int  # tokens generated one by one, at most
    passes: str  # passes of the model over those sequences


def model_work(config: dict) -> list[StageWork]:
    """The model stages of a run of ``config`` (a complete config: the schema's defaults applied)."""
    batch, gen, est = config["batch_config"], config["generation"], config["estimator"]
    G, T = batch["G"], gen["max_new_tokens"]
    E = -(-batch["E_total_sequences"] // G) * G
    U = batch["B_U"] * G
    e_jobs, u_jobs = batch["E_num_shards"], batch["U_num_shards"]
    points = len(est["eta_list"]) * (2 if est["central_difference"] else 1)
    fresh = est["eta_list"] if est["fresh_etas"] is None else est["fresh_etas"]
    verified = gen["fresh_rollouts"] == "verification"
    rows = [
        StageWork("rollout (E)", e_jobs, E, E * T, "prefill, one decoding step per token"),
        StageWork("rollout (U)", u_jobs, U, U * T, "prefill, one decoding step per token"),
        StageWork("teacher_force_x", e_jobs, E, 0, "forward + backward"),
        StageWork("teacher_force_y", u_jobs, U, 0, "forward + backward"),
        StageWork("directional", e_jobs, E, 0, "forward with a tangent"),
        StageWork("snis_shard", e_jobs, E, 0, f"{1 + points} forwards (θ and {points} points θ ± ηv)"),
        StageWork("attribution", 1, U, 0, "forward with a tangent (U tokens)"),
    ]
    if fresh:
        rows.append(StageWork(
            "fresh_rollout", len(fresh) * e_jobs, E, len(fresh) * E * T,
            f"{len(fresh)} forwards (one per η), then the suffixes after a change" if verified
            else f"{len(fresh)} generations of the E batch"))
    measuring = variant_rules.with_snis(config)
    for name in variant_rules.names(config):
        snis = f" + {1 + points} forwards (snis: true)" if name in measuring else ""
        rows.append(StageWork(f"variant {name}", e_jobs * (2 if snis else 1), E, 0, f"forward with a tangent{snis} "
                              "(and a Y pass over the U batch when its objective differs)"))
    return rows
