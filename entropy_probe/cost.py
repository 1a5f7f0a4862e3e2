"""The model work of a run, counted from its config before it runs: per stage, its jobs, the
sequences it touches, the tokens it may generate, run forward and run backward, and its passes
over those sequences. Upper bounds where lengths are unknown: every response at
``generation.max_new_tokens`` and, for the forward and backward tokens, every prompt at
``data.max_prompt_tokens`` (no bound without it). Tokens are counted as
:mod:`entropy_probe.job_cost` counts the measured ones, which each job records as it runs.

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
    forward: int | None  # tokens run forward, at most (None: prompts unbounded)
    backward: int | None  # tokens run backward, at most
    passes: str  # passes of the model over those sequences


def model_work(config: dict) -> list[StageWork]:
    """The model stages of a run of ``config`` (a complete config: the schema's defaults applied)."""
    batch, gen, est = config["batch_config"], config["generation"], config["estimator"]
    G, T = batch["G"], gen["max_new_tokens"]
    E = -(-batch["E_total_sequences"] // G) * G
    U = batch["B_U"] * G
    prompt = config["data"]["max_prompt_tokens"]

    def tokens(sequences: int, passes: float) -> int | None:
        """Tokens of ``passes`` passes over ``sequences`` sequences, at most."""
        return int(sequences * (prompt + T) * passes) if prompt else None

    e_jobs, u_jobs = batch["E_num_shards"], batch["U_num_shards"]
    points = len(est["eta_list"]) * (2 if est["central_difference"] else 1)
    fresh = est["eta_list"] if est["fresh_etas"] is None else est["fresh_etas"]
    verified = gen["fresh_rollouts"] == "verification"
    recompute = 2 if config["teacher_forcing"]["gradient_checkpointing"] else 1
    rows = [
        StageWork("rollout (E)", e_jobs, E, E * T, tokens(E, 1), 0, "prefill, one decoding step per token"),
        StageWork("rollout (U)", u_jobs, U, U * T, tokens(U, 1), 0, "prefill, one decoding step per token"),
        StageWork("teacher_force_x", e_jobs, E, 0, tokens(E, recompute), tokens(E, 1), "forward + backward"),
        StageWork("teacher_force_y", u_jobs, U, 0, tokens(U, recompute), tokens(U, 1), "forward + backward"),
        StageWork("directional", e_jobs, E, 0, tokens(E, 1), 0, "forward with a tangent"),
        StageWork("snis_shard", e_jobs, E, 0, tokens(E, 1 + points), 0,
                  f"{1 + points} forwards (θ and {points} points θ ± ηv)"),
        StageWork("attribution", 1, U, 0, tokens(U, 1), 0, "forward with a tangent (U tokens)"),
    ]
    if fresh:
        # verification: one pass over every sequence, then at most every sequence generated on
        rows.append(StageWork(
            "fresh_rollout", len(fresh) * e_jobs, E, len(fresh) * E * T, tokens(E, len(fresh) * (2 if verified else 1)),
            0, f"{len(fresh)} forwards (one per η), then the suffixes after a change" if verified
            else f"{len(fresh)} generations of the E batch"))
    measuring = variant_rules.with_snis(config)
    objectives_passed = {variant_rules.objective_id(config)}  # variants sharing an objective share its Y pass
    for name in variant_rules.names(config):
        objective = variant_rules.objective_id(variant_rules.variant_config(config, name))
        own_y = objective not in objectives_passed
        objectives_passed.add(objective)
        snis = name in measuring
        forward = tokens(E, 1 + (1 + points if snis else 0))
        backward = 0
        if own_y and forward is not None:
            forward, backward = forward + tokens(U, recompute), tokens(U, 1)
        rows.append(StageWork(
            f"variant {name}", e_jobs * (2 if snis else 1) + (u_jobs if own_y else 0), E, 0, forward, backward,
            "forward with a tangent" + (f" + {1 + points} forwards (snis: true)" if snis else "")
            + (" + a Y pass over the U batch (its objective)" if own_y else "")))
    return rows
