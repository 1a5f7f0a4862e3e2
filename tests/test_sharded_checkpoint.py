"""Checkpoints of a multi-process FSDP run as the probe's input: a real two-process FSDP2 run of
the HF Trainer (tests/fsdp_trainer_run.py under torchrun, gloo, the embedded policy) saves
``pytorch_model_fsdp_0/`` and ``optimizer_0/`` as DCP folders after every step, as accelerate
does on GPUs. The probe reads them in one process (entropy_probe.dcp_files, nothing unpickled
beyond an allow-list).

Checked: the weights and AdamW moments read by name equal what the ranks held (gathered from
their shards) exactly; the probe's AdamW direction from checkpoint t is the step the trainer
took to t + 1; a ``.metadata`` that would run code is refused without running it; a trajectory
over the run's checkpoints runs end to end through the workflow.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from entropy_probe import dcp_files, models, shards, update
from entropy_probe.checkpoint_step import next_spec
from entropy_probe.trainer_checkpoint import load_trainer_checkpoint, learning_rate

CHECKPOINTS = (1, 2, 3)


def _config(toy_policy_dir, checkpoint: Path) -> dict:
    return {"name_or_path": str(toy_policy_dir), "checkpoint": str(checkpoint), "trust_remote_code": False}


def _policy(toy_policy_dir, checkpoint: Path):
    spec = models.resolve_spec(_config(toy_policy_dir, checkpoint))
    return spec, models.load_policy(spec, "float32", "cpu")


def test_the_weights_and_moments_read_by_name_are_the_ranks(fsdp_run, toy_policy_dir):
    out, records = fsdp_run
    for step in CHECKPOINTS:
        checkpoint = out / f"checkpoint-{step}"
        assert sorted(p.name for p in (checkpoint / "optimizer_0").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                  "__1_0.distcp"]
        spec, model = _policy(toy_policy_dir, checkpoint)
        assert spec["checkpoint"]["kind"] == "sharded" and spec["checkpoint"]["global_step"] == step
        held = records["parameters"][step]
        assert set(dict(model.named_parameters())) == set(held)
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), held[name]), name
        state = load_trainer_checkpoint(checkpoint, model).state
        assert state.steps == [float(step)]
        assert [g["weight_decay"] for g in state.groups] == [0.1, 0.0]  # the Trainer's decay / no-decay groups
        for name, moments in records["moments"][step].items():
            assert torch.equal(state.per_param[name].exp_avg, moments["exp_avg"]), name
            assert torch.equal(state.per_param[name].exp_avg_sq, moments["exp_avg_sq"]), name


@pytest.mark.parametrize("step", CHECKPOINTS[:-1])
def test_adamw_direction_from_a_sharded_checkpoint_is_the_step_the_trainer_took(fsdp_run, toy_policy_dir, step):
    """θ_t + lr_t · v = θ_{t+1}, v from checkpoint t's AdamW state and step t + 1's recorded
    (clipped) gradient g, Y = −g (in float64, at the float32 θ's resolution)."""
    out, records = fsdp_run
    spec, model = _policy(toy_policy_dir, out / f"checkpoint-{step}")
    ckpt = load_trainer_checkpoint(out / f"checkpoint-{step}", model)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    after = dict(models.load_policy(next_spec(spec, out / f"checkpoint-{step + 1}"), "float32", "cpu")
                 .named_parameters())
    gradient = records["gradients"][step]  # the step after checkpoint t (records are 0-based)
    v = update.adamw_direction({n: -g for n, g in gradient.items()}, theta, ckpt.state.per_param)
    lr, source = learning_rate(ckpt.layout)
    assert "scheduler.pt" in source
    moved = 0.0
    for name, t in theta.items():
        predicted = t.double() + lr * v[name]
        target = after[name].detach().double()
        ulp = torch.finfo(torch.float32).eps * target.abs().clamp(min=1e-6)
        assert ((predicted - target).abs() <= 2 * ulp + 1e-6 * lr * v[name].abs()).all(), name
        moved = max(moved, float((target - t.double()).abs().max()))
    assert moved > 1e-5


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_metadata_that_would_run_code_is_refused_unrun(fsdp_run, toy_policy_dir, tmp_path):
    out, _ = fsdp_run
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(out / "checkpoint-1", checkpoint)
    marker = tmp_path / "ran"
    (checkpoint / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(dcp_files.DCPError, match=r"\.metadata: refers to (posix|os)\.system, which is not part of a "
                                                 r"DCP index; refused"):
        _policy(toy_policy_dir, checkpoint)
    assert not marker.exists()
    # a value item (as an optimizer's param-group entries are saved) that would run code: refused, unrun
    from torch.distributed.checkpoint import save

    folder = tmp_path / "values"
    save({"x": torch.zeros(2), "evil": _RunsCode(marker)}, checkpoint_id=str(folder), no_dist=True)
    assert torch.equal(dcp_files.load(folder, ["x"])["x"], torch.zeros(2))
    with pytest.raises(dcp_files.DCPError, match=r"cannot read the checkpoint \(a saved value refers to "
                                                 r"(posix|os)\.system, which loading with weights_only refuses"):
        dcp_files.load(folder, ["x", "evil"])
    assert not marker.exists()


@pytest.mark.workflow
def test_a_trajectory_over_the_sharded_checkpoints(checkpoint_trajectories, fsdp_run):
    results = checkpoint_trajectories["fsdp"] / "results"
    rows = json.loads((results / "trajectory.json").read_text())["rows"]
    assert [(r["pair"], r["global_step"], r["next_global_step"]) for r in rows] == [
        ("checkpoint-1_to_checkpoint-2", 1, 2)]
    v, _ = shards.read_shard(results / "pairs" / "checkpoint-1_to_checkpoint-2" / "update" / "v.safetensors")
    before, after = fsdp_run[1]["parameters"][1], fsdp_run[1]["parameters"][2]
    for name, difference in v.items():
        assert torch.equal(difference, after[name].double() - before[name].double()), name
    assert -1 <= rows[0]["cosine"] <= 1  # the probe's own AdamW step from optimizer_0/, against the trainer's


def test_bad_sharded_checkpoints_fail_in_one_line(fsdp_run, toy_policy_dir, tmp_path):
    from entropy_probe.config import load_config
    from entropy_probe.errors import ConfigError
    from entropy_probe.toy import build_model

    out, _ = fsdp_run
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(out / "checkpoint-1", checkpoint)

    def one_line(error, *fragments):
        message = str(error.value)
        assert "\n" not in message and all(f in message for f in fragments), message

    # no architecture: a sharded checkpoint saves no config.json
    with pytest.raises(ConfigError) as error:
        load_config(None, {"model": {"checkpoint": str(checkpoint)}, "update": {"optimizer": "adamw"}})
    one_line(error, "model.name_or_path:", "FSDP sharded checkpoint", "saves no config.json")
    # another architecture in model.name_or_path
    other = tmp_path / "other"
    build_model(seed=0, hidden_size=32).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_policy_dir / name, other / name)
    with pytest.raises(dcp_files.DCPError) as error:
        _policy(other, checkpoint)
    one_line(error, "pytorch_model_fsdp_0", "'model.model.embed_tokens.weight' has shape (14, 48), the model's (14, 32)")
    # a rank's file missing
    (checkpoint / "optimizer_0" / "__1_0.distcp").unlink()
    model = _policy(toy_policy_dir, checkpoint)[1]
    with pytest.raises(dcp_files.DCPError) as error:
        load_trainer_checkpoint(checkpoint, model)
    one_line(error, "optimizer_0/__1_0.distcp: missing; the index names 2 rank files (__0_0.distcp, __1_0.distcp)")
    # a truncated one
    shutil.copy(out / "checkpoint-1" / "optimizer_0" / "__1_0.distcp", checkpoint / "optimizer_0" / "__1_0.distcp")
    with open(checkpoint / "optimizer_0" / "__1_0.distcp", "r+b") as f:
        f.truncate(100)
    with pytest.raises(dcp_files.DCPError) as error:
        load_trainer_checkpoint(checkpoint, model)
    one_line(error, "optimizer_0/__1_0.distcp: 100 bytes, the index reads up to byte", "truncated")
