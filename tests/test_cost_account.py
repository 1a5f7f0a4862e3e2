"""The cost account: every model job records the tokens it generated, ran forward and ran
backward and its seconds, and summary.json sums them per stage. Held against counts made here
from the shards themselves (their attention masks and lengths), on the session's default run."""
from __future__ import annotations

import json

import pytest

from entropy_probe import cost, job_cost, shards


def test_the_account_sums_jobs_per_stage_in_the_order_first_seen():
    jobs = [{"stage": "rollout E", "generated_tokens": 10, "forward_tokens": 30, "backward_tokens": 0, "seconds": 1.0},
            {"stage": "teacher_force_x", "generated_tokens": 0, "forward_tokens": 30, "backward_tokens": 30,
             "seconds": 3.0},
            {"stage": "rollout E", "generated_tokens": 5, "forward_tokens": 20, "backward_tokens": 0, "seconds": 4.0}]
    account = job_cost.by_stage(jobs)
    assert [r["stage"] for r in account["stages"]] == ["rollout E", "teacher_force_x"]
    rollout = account["stages"][0]
    assert (rollout["jobs"], rollout["generated_tokens"], rollout["forward_tokens"], rollout["seconds"]) == (2, 15, 50, 5.0)
    assert rollout["share_of_seconds"] == pytest.approx(5 / 8)
    assert account["total"] == {"jobs": 3, "generated_tokens": 15, "forward_tokens": 80, "backward_tokens": 30,
                                "seconds": 8.0, "share_of_seconds": 1.0}
    lines = job_cost.format_account(account).splitlines()
    assert len(lines) == 4 and lines[-1].split()[:5] == ["total", "3", "15", "80", "30"]


def test_a_jobs_label_names_what_its_rule_does_not():
    assert job_cost.label("rollout", {"kind": "E", "shard": "000"}) == "rollout E"
    assert job_cost.label("teacher_force_x", {"kind": "X", "shard": "001"}) == "teacher_force_x"
    assert job_cost.label("variant_directional", {"variant": "dapo", "shard": "000"}) == "variant_directional dapo"
    assert job_cost.label("snis_shard", {"shard": "000"}) == "snis_shard"


def test_the_counted_bounds_follow_the_passes():
    from entropy_probe.config_schema import fill_defaults

    config = {"data": {"max_prompt_tokens": 7}, "generation": {"max_new_tokens": 3},
              "batch_config": {"E_total_sequences": 8, "G": 4, "B_U": 1, "E_num_shards": 2, "U_num_shards": 1},
              "estimator": {"eta_list": [1e-3, 1e-2], "central_difference": True, "fresh_etas": [1e-3]}}
    fill_defaults(config)
    work = {w.stage: w for w in cost.model_work(config)}
    assert work["rollout (E)"].generated == 8 * 3 and work["rollout (E)"].forward == 8 * 10
    assert work["teacher_force_y"].forward == work["teacher_force_y"].backward == 4 * 10
    assert work["snis_shard"].forward == 8 * 10 * (1 + 4)
    assert work["fresh_rollout"].forward == 8 * 10 * 2  # the verification pass, then at most everything again
    config["data"]["max_prompt_tokens"] = 0
    assert cost.model_work(config)[0].forward is None  # prompts unbounded: no bound claimed


def _tokens(paths) -> tuple[int, int]:
    """(sequence tokens, response tokens) of rollout shards, counted from their tensors."""
    read = [shards.read_shard(p)[0] for p in paths]
    return (sum(int(t["attention_masks"].sum()) for t in read), sum(int(t["response_lens"].sum()) for t in read))


@pytest.mark.workflow
def test_summary_accounts_every_model_job_with_the_tokens_of_its_shards(default_run):
    results = default_run / "results"
    summary = json.loads((results / "summary.json").read_text())
    account = summary["cost"]
    assert account["not_recorded"] == []
    stages = {r["stage"]: r for r in account["stages"]}
    E, E_responses = _tokens(sorted((results / "rollouts" / "E").glob("shard_*.safetensors")))
    U, U_responses = _tokens(sorted((results / "rollouts" / "U").glob("shard_*.safetensors")))
    etas = shards.read_metadata(results / "snis" / "shard_000.safetensors")["etas"]
    assert len(etas) == 6  # three η, central differences

    def expect(stage, jobs, generated, forward, backward):
        row = stages[stage]
        assert (row["jobs"], row["generated_tokens"], row["forward_tokens"], row["backward_tokens"]) == \
            (jobs, generated, forward, backward), stage
        assert row["seconds"] > 0, stage

    expect("rollout E", 2, E_responses, E, 0)
    expect("rollout U", 2, U_responses, U, 0)
    expect("teacher_force_x", 2, 0, E, E)
    expect("teacher_force_y", 2, 0, U, U)
    expect("directional", 2, 0, E, 0)
    expect("snis_shard", 2, 0, (1 + len(etas)) * E, 0)
    expect("attribution", 1, 0, U, 0)
    expect("variant_directional dapo", 2, 0, E, 0)
    expect("variant_directional adamw", 2, 0, E, 0)
    expect("variant_snis_shard dapo", 2, 0, (1 + len(etas)) * E, 0)
    objective = next(s for s in stages if s.startswith("variant_teacher_force_y"))
    expect(objective, 2, 0, U, U)  # dapo's own objective: its own Y pass

    # fresh rollouts: each η's verification pass runs every E sequence forward once, and generates
    # no more than regenerating every response would
    fresh = stages["fresh_rollout"]
    fresh_etas = sorted({shards.read_metadata(p)["eta"] for p in (results / "fresh").rglob("shard_*.safetensors")})
    assert fresh["jobs"] == 2 * len(fresh_etas)
    regenerated = sum(r["cost"]["regeneration_tokens"] for r in summary["delta_h_sampler"]["rows"])
    assert fresh["generated_tokens"] <= regenerated and fresh["forward_tokens"] >= len(fresh_etas) * E
    assert fresh["generated_tokens"] == sum(r["cost"]["generated_tokens"] for r in summary["delta_h_sampler"]["rows"])

    assert sum(r["share_of_seconds"] for r in account["stages"]) == pytest.approx(1.0)
    assert account["total"]["jobs"] == sum(r["jobs"] for r in account["stages"])
    # every model job of the run is in the account: one per benchmark file of a model rule
    model_rules = ("rollout_", "teacher_force_", "directional_", "snis_shard_", "fresh_rollout_", "attribution",
                   "variant_directional_", "variant_snis_shard_", "variant_teacher_force_")
    benchmarked = [p for p in (results / "benchmarks").glob("*.tsv") if p.stem.startswith(model_rules)]
    assert account["total"]["jobs"] == len(benchmarked)
