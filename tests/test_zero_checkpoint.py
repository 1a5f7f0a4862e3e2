"""DeepSpeed ZeRO-2 checkpoints as the probe's input, from a fixture made by a real two-process
ZeRO-2 run of the HF Trainer (tests/fixtures/deepspeed/make_checkpoints.py, its versions in
run/versions.json; DeepSpeed builds from source in minutes, so it is not installed here).

Checked without DeepSpeed: the ranks' partitions join into one AdamW state by name that is the
state the trainer stepped with — the gradient of step t + 1, recovered from the first moments of
checkpoints t and t + 1, gives the second moment of t + 1 and, through the probe's AdamW direction
from checkpoint t, the weights of t + 1 (a piece put at the wrong place breaks both); nothing is
unpickled beyond an allow-list; bad folders fail in one line; a trajectory runs on them.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from entropy_probe import update, zero_checkpoint
from entropy_probe.trainer_checkpoint import check_state_fits, layout_of, learning_rate, load_trainer_checkpoint
from workflow_util import REPO, raises_one_line

FIXTURE = REPO / "tests" / "fixtures" / "deepspeed"
RUN = FIXTURE / "run"
BETAS = (0.9, 0.999)  # the run's AdamW betas (torch defaults, as the Trainer sets them)


def _model(step: int):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(RUN / f"checkpoint-{step}", dtype=torch.float32)


def test_the_fixture_is_small_and_says_what_made_it():
    size = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    assert size < 1_000_000
    versions = json.loads((RUN / "versions.json").read_text())
    assert set(versions) == {"torch", "deepspeed", "transformers"}


@pytest.mark.parametrize("step", (1, 2))
def test_the_joined_state_is_the_one_the_trainer_stepped_with(step, monkeypatch):
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(k.get("weights_only")) or original(f, *a, **k))
    model = _model(step)
    layout = layout_of(RUN / f"checkpoint-{step}")
    assert layout.optimizer_format == "zero" and layout.optimizer.name == f"global_step{step}"
    before = load_trainer_checkpoint(layout.path, model).state
    after = load_trainer_checkpoint(RUN / f"checkpoint-{step + 1}", _model(step + 1)).state
    assert loads and all(w is True for w in loads) and "deepspeed" not in sys.modules
    assert before.steps == [float(step)] and [g["weight_decay"] for g in before.groups] == [0.1, 0.0]
    theta = {n: p.detach() for n, p in model.named_parameters()}
    target = {n: p.detach().double() for n, p in _model(step + 1).named_parameters()}
    assert set(before.per_param) == set(theta)
    gradient = {n: (after.per_param[n].exp_avg.double() - BETAS[0] * before.per_param[n].exp_avg.double())
                / (1 - BETAS[0]) for n in theta}
    v = update.adamw_direction({n: -g for n, g in gradient.items()}, theta, before.per_param)
    lr, _ = learning_rate(layout)
    for name, t in theta.items():
        second = BETAS[1] * before.per_param[name].exp_avg_sq.double() + (1 - BETAS[1]) * gradient[name] ** 2
        assert torch.allclose(second, after.per_param[name].exp_avg_sq.double(), rtol=2e-6, atol=0), name
        ulp = torch.finfo(torch.float32).eps * target[name].abs().clamp(min=1e-6)
        assert ((t.double() + lr * v[name] - target[name]).abs() <= 2 * ulp + 1e-6 * lr * v[name].abs()).all(), name
    assert check_state_fits(layout.path) == [list(g["params"]) for g in
                                             zero_checkpoint.optimizer_state_dict(layout.optimizer)["param_groups"]]


class _RunsCode:
    def __reduce__(self):
        return (exec, ("raise SystemExit('ran')",))


def test_bad_zero_checkpoints_fail_in_one_line(tmp_path):
    def one_line(call, *fragments):
        raises_one_line(zero_checkpoint.ZeroCheckpointError, call, *fragments)

    step_dir = tmp_path / "global_step2"
    shutil.copytree(RUN / "checkpoint-2" / "global_step2", step_dir)
    (step_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").rename(tmp_path / "aside.pt")
    one_line(lambda: zero_checkpoint.optimizer_state_dict(step_dir), "2 data-parallel ranks")
    (step_dir / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes((tmp_path / "aside.pt").read_bytes())
    one_line(lambda: zero_checkpoint.optimizer_state_dict(step_dir), "the partition of rank 1 is missing")
    (step_dir / "zero_pp_rank_2_mp_rank_00_optim_states.pt").rename(step_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    torch.save({"optimizer_state_dict": _RunsCode()}, step_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
               pickle_protocol=2)
    one_line(lambda: zero_checkpoint.optimizer_state_dict(step_dir), "zero_pp_rank_1_mp_rank_00_optim_states.pt: "
             "cannot load (UnpicklingError")
    (step_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    one_line(lambda: zero_checkpoint.optimizer_state_dict(step_dir), "a ZeRO-3 checkpoint", "not covered")


@pytest.mark.workflow
def test_a_trajectory_over_the_zero_checkpoints(checkpoint_trajectories):
    rows = json.loads((checkpoint_trajectories["zero"] / "results" / "trajectory.json").read_text())["rows"]
    assert [(r["global_step"], r["next_global_step"]) for r in rows] == [(2, 3)]
    assert -1 <= rows[0]["cosine"] <= 1  # the probe's own AdamW step from global_step2/, against the trainer's


def test_the_fixture_script_runs_where_deepspeed_imports(tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed here (the fixture was made where it is)")
    copy = tmp_path / "deepspeed"
    shutil.copytree(FIXTURE, copy, ignore=shutil.ignore_patterns("run"))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(copy / "make_checkpoints.py")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (copy / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2",
                                                                           "checkpoint-3"]
