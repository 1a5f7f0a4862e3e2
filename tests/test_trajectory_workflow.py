"""The workflow over a real TRL run: ``model.checkpoints`` on the checkpoints of a
GRPOTrainer run (tests/conftest.py ``trl_run``: the embedded policy trained four steps with torch
AdamW, weight decay, a linear schedule and clipping, a checkpoint after each), one probe per pair
of consecutive checkpoints with ``update.optimizer: checkpoint_diff``.

Checked: every checkpoint loads with no names file (its AdamW state in the Trainer's order feeds
the probe's own step); δH₁ = X·(θ_{t+1} − θ_t) of each step agrees with the exact change of H
between the two checkpoints (enumeration, θ_t's nucleus held fixed: the quantity δH₁ predicts)
within its SE plus the measured second-order term; the trajectory table and plot are produced;
each pair is cached on its own (a checkpoint added to the run schedules that pair only).

One Snakemake run of two pairs (checkpoints 1-3), 1024 E sequences each, shared by the tests.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

pytest.importorskip("trl")

from entropy_probe import exact, gradients, models, prompts, shards  # noqa: E402
from workflow_util import REPO, dry_run_jobs, run_snakemake  # noqa: E402

pytestmark = pytest.mark.workflow

PAIRS = ("checkpoint-1_to_checkpoint-2", "checkpoint-2_to_checkpoint-3")
SETTINGS = {
    "batch_config": {"E_total_sequences": 1024, "G": 4, "B_U": 8, "E_num_shards": 1, "U_num_shards": 1},
    # η = 1, the trainer's step, is added to the sweep; the sampler's ΔH is tested elsewhere
    "estimator": {"eta_list": [0.5], "fresh_etas": []},
    # as trl_harness trains; no update variants (they need a U-batch v)
    "update": {"optimizer": "checkpoint_diff", "loss_type": "dapo", "max_grad_norm": 1.0, "variants": {}},
    "model": {"device": "cpu"},
}


def _write_config(work, trl_run, toy_policy_dir, glob: str, name: str = "probe.yaml") -> None:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for section, values in SETTINGS.items():
        config[section].update(values)
    config["model"]["checkpoints"] = str(trl_run.output_dir / glob)
    config["data"]["source"] = str(toy_policy_dir / "prompts.jsonl")
    (work / name).write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def trajectory_run(trl_run, toy_policy_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("trajectory")
    _write_config(work, trl_run, toy_policy_dir, "checkpoint-[1-3]")
    run_snakemake(work, "probe.yaml", "--cores", "2")
    return work


def _summary(work, pair: str) -> dict:
    return json.loads((work / "results" / "pairs" / pair / "summary.json").read_text())


def test_the_trajectory_table_and_plot(trajectory_run, trl_run):
    results = trajectory_run / "results"
    table = (results / "trajectory.txt").read_text().splitlines()
    assert (results / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((results / "trajectory.json").read_text())
    rows = report["rows"]
    assert [r["pair"] for r in rows] == list(PAIRS) and list(report["pairs"]) == list(PAIRS)
    assert [(r["global_step"], r["next_global_step"]) for r in rows] == [(1, 2), (2, 3)]
    assert [line.split()[0] for line in table[2:]] == ["1->2", "2->3"]
    lr_of_step = {e["step"]: e["learning_rate"] for e in trl_run.log_history if "learning_rate" in e}
    for row in rows:
        assert row["learning_rate"] == pytest.approx(lr_of_step[row["next_global_step"]], rel=1e-12)
        assert 0.2 < row["H"] < 0.5 and 0 < row["H_se"] < 0.05
        assert row["delta_h1"] < 0 and row["delta_h"] < 0  # the run lowers the entropy, step by step
        assert row["ess"] > 900  # a small step: the weights stay near 1
        assert -1 <= row["cosine"] <= 1 and 0.5 < row["norm_ratio"] < 2 and 0.5 < row["sign_agreement"] <= 1
        assert row["delta_h_sampler"] is None  # the sampler's column waits for the fresh rollouts


def test_every_checkpoint_loads_with_no_names_file(trajectory_run, trl_run):
    for step, pair in enumerate(PAIRS, start=1):
        folder = trajectory_run / "results" / "pairs" / pair
        checkpoint = str(trl_run.checkpoint(step).resolve())
        spec = json.loads((folder / "policy.json").read_text())
        assert spec["model_dir"] == checkpoint and spec["checkpoint"]["global_step"] == step
        v_meta = shards.read_metadata(folder / "update" / "v.safetensors")
        assert v_meta["optimizer"] == "checkpoint_diff" and v_meta["training_eta"] == 1.0
        assert v_meta["next_checkpoint"] == str(trl_run.checkpoint(step + 1).resolve())
        state = json.loads((folder / "update" / "step_comparison.json").read_text())["optimizer_state"]
        assert state["optimizer_state"] == checkpoint + "/optimizer.pt"
        assert state["optimizer_step"] == step and [g["weight_decay"] for g in state["optimizer_param_groups"]] == [
            0.1, 0.0]
        summary = _summary(trajectory_run, pair)
        assert summary["u_batch"] is None and summary["u_jackknife"] is None  # v is no U-batch estimate
        marked = [r for r in summary["rows"] if r.get("training")]
        assert [r["eta"] for r in marked] == [1.0]
        assert "* η = 1 is that step" in (folder / "summary.txt").read_text()


def test_a_later_checkpoints_e_batch_is_redrawn_from_the_one_before(trajectory_run, trl_run):
    """The E shard at checkpoint 2 comes from checkpoint 1's by verification (same slots, same
    noise): the shard generation at checkpoint 2 draws, token for token (regenerated here), at the
    cost of a teacher-forced pass and what changed."""
    from entropy_probe import rewards, rollout
    from entropy_probe.config import load_config
    from entropy_probe.plan import shard_slots

    folders = [trajectory_run / "results" / "pairs" / pair for pair in PAIRS]
    (_, first), (redrawn, meta) = (shards.read_shard(f / "rollouts" / "E" / "shard_000.safetensors") for f in folders)
    assert first["drawn_by"] == {"method": "generation"}
    assert meta["drawn_by"]["method"] == "verification"
    assert meta["drawn_by"]["from"].endswith(f"pairs/{PAIRS[0]}/rollouts/E/shard_000.safetensors")
    assert meta["cost"]["generated_tokens"] < meta["cost"]["regeneration_tokens"] / 4, meta["cost"]
    plan = shards.read_json(folders[1] / "plan" / "E.json")
    e_set = shards.read_json(folders[1] / "data" / "train.json")
    examples = prompts.load_prepared(trajectory_run / e_set["file"], e_set["sha256"])
    generation = _summary(trajectory_run, PAIRS[1])["config"]["generation"]
    model = models.load_policy(trl_run.checkpoint(2), "float32", "cpu")
    drawn = rollout.rollout_shard(
        model, models.load_tokenizer(trl_run.checkpoint(2)), examples, plan["shards"][0], G=4, kind="E",
        shard_index=0, slots=shard_slots(plan, 0), seed=0, temperature=generation["temperature"],
        top_p=generation["top_p"], max_new_tokens=generation["max_new_tokens"], rollout_batch_size=16,
        gen_batch_size=64, reward_fn=rewards.from_config(load_config(trajectory_run / "probe.yaml")["reward"]))
    assert redrawn.keys() == drawn.keys()
    for name, value in drawn.items():
        if name in ("token_log_q", "rb_entropies", "tempered_entropies"):
            torch.testing.assert_close(redrawn[name], value, rtol=0, atol=2e-5)
        else:
            assert torch.equal(redrawn[name], value), name
    assert meta["drawn_by"]["changed_responses"] > 0  # the step moved something


def _exact_step(trl_run, step: int, prompts: list[str], generation: dict) -> dict:
    """Exact H(θ_t), ∇H(θ_t)·Δθ and H(θ_t + ηΔθ) (θ_t's nucleus, and the own nucleus) by enumeration."""
    before = models.load_policy(trl_run.checkpoint(step), "float32", "cpu")
    after = dict(models.load_policy(trl_run.checkpoint(step + 1), "float32", "cpu").named_parameters())
    tokenizer = models.load_tokenizer(trl_run.checkpoint(step))
    v = {n: after[n].detach().double() - p.detach().double() for n, p in before.named_parameters()}
    kwargs = dict(temperature=generation["temperature"], top_p=generation["top_p"],
                  max_new_tokens=generation["max_new_tokens"], normalization="token")
    H, grad = exact.exact_entropy_and_grad(before, tokenizer, prompts, **kwargs)
    with torch.no_grad():
        at = {(eta, nucleus): exact.exact_entropy_at(before, tokenizer, prompts, direction=v, eta=eta,
                                                     nucleus=nucleus, **kwargs) - H
              for eta, nucleus in ((1.0, "base"), (-1.0, "base"), (1.0, "own"))}
    return {"H": float(H), "delta_h1": gradients.dot(gradients.restrict(grad, v), v), "delta_h": at[1.0, "base"],
            "central": (at[1.0, "base"] - at[-1.0, "base"]) / 2, "delta_h_own": at[1.0, "own"]}


@pytest.fixture(scope="module")
def steps_against_truth(trajectory_run, trl_run) -> dict[int, tuple[dict, dict, dict]]:
    """step -> (the pair's summary, its row of the trainer's step, the exact values)."""
    out = {}
    for step, pair in enumerate(PAIRS, start=1):
        summary = _summary(trajectory_run, pair)
        e_set = shards.read_json(trajectory_run / "results" / "pairs" / pair / "data" / "train.json")
        texts = [e["prompt"] for e in prompts.load_prepared(trajectory_run / e_set["file"], e_set["sha256"])]
        [row] = [r for r in summary["rows"] if r.get("training")]
        out[step] = summary, row, _exact_step(trl_run, step, texts, summary["config"]["generation"])
    return out


@pytest.mark.parametrize("step", [1, 2])
def test_delta_h1_of_each_step_agrees_with_the_exact_change(steps_against_truth, step):
    """δH₁(1) = X·(θ_{t+1} − θ_t) against H(θ_{t+1}) − H(θ_t) with θ_t's nucleus (exact): within
    4 SE plus the second-order term |ΔH − ∇H·Δθ| measured exactly. Also: δH₁ against the exact
    ∇H·Δθ and the SNIS ΔH(1) against the exact ΔH, within 4 SE each."""
    summary, row, truth = steps_against_truth[step]
    second_order = abs(truth["delta_h"] - truth["delta_h1"])
    report = (f"step {step}->{step + 1}: δH₁ {row['delta_h1']:.4g} ± {row['delta_h1_se']:.2g}, SNIS ΔH "
              f"{row['delta_h']:.4g} ± {row['delta_h_se']:.2g}; exact: H {truth['H']:.5g}, ∇H·Δθ "
              f"{truth['delta_h1']:.4g}, ΔH {truth['delta_h']:.4g} (θ_t's nucleus), central {truth['central']:.4g}, "
              f"ΔH own nucleus {truth['delta_h_own']:.4g}")
    print(report)
    assert abs(row["delta_h1"] - truth["delta_h"]) <= 4 * row["delta_h1_se"] + second_order, report
    assert abs(row["delta_h1"] - truth["delta_h1"]) <= 4 * row["delta_h1_se"], report
    assert abs(row["delta_h"] - truth["delta_h"]) <= 4 * row["delta_h_se"], report
    assert math.isclose(summary["delta_h_snis"]["rows"][0]["H_base"], truth["H"], abs_tol=4 * 0.02), report


def test_the_agreement_has_teeth(steps_against_truth):
    """At least one step's change is resolved: its SE is under half the exact ∇H·Δθ (how small a
    step's change is depends on the run, and the tiny policy's training rounds differently on
    different CPUs)."""
    resolved = [row["delta_h1_se"] < abs(truth["delta_h1"]) / 2 for _, row, truth in steps_against_truth.values()]
    assert any(resolved), resolved


def test_each_pair_is_cached_on_its_own(trajectory_run, trl_run, toy_policy_dir):
    assert dry_run_jobs(trajectory_run, "probe.yaml") == {}
    _write_config(trajectory_run, trl_run, toy_policy_dir, "checkpoint-*", "longer.yaml")  # checkpoint 4 added
    one_pair = {"policy_spec": 1, "prepare_data": 1, "plan": 2, "rollout": 2, "e_stats": 1, "u_objective": 1,
                "teacher_force_x": 1, "teacher_force_y": 1, "reduce_gradients": 2, "update_vector": 1,
                "step_comparison": 1, "directional": 1, "snis_shard": 1, "delta_h1": 1, "delta_h_snis": 1,
                "summary": 1}
    assert dry_run_jobs(trajectory_run, "longer.yaml") == one_pair | {"trajectory": 1, "all": 1}


def test_the_trajectory_report_reads_in_a_browser(trajectory_run, tmp_path):
    """The report's landing page over training, moved into an empty directory: the plot loaded,
    the table within its column, one row per step."""
    from browser import assert_readable, open_moved_report

    run_snakemake(trajectory_run, "probe.yaml", "--report", "report.html", timeout=300)
    page = open_moved_report(trajectory_run / "report.html", tmp_path / "elsewhere")
    assert_readable(page)
    assert all(step in page.tables[0]["text"] for step in ("1->2", "2->3"))
