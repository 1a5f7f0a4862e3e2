"""The Snakemake workflow end to end (conftest.RUN_SETTINGS: 2048 E sequences, G = 4, B_U = 16,
two E and two U shards): outputs, idempotence, resuming one lost shard, lint, inspector. Works on
a copy of the session's uninterrupted run (conftest.default_run); deselect with
``-m "not workflow"``.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import RUN_CONFIG

from entropy_probe.shards import read_json, read_shard

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[1]
TARGET = "rollouts"  # the dry runs look at the rollout shards only
SHARDS = ["results/rollouts/E/shard_000.safetensors", "results/rollouts/E/shard_001.safetensors",
          "results/rollouts/U/shard_000.safetensors", "results/rollouts/U/shard_001.safetensors"]


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``snakemake -s <repo>/Snakefile --directory <workdir> --configfile <workdir>/probe.yaml ARGS``."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           *args, "--configfile", str(workdir / RUN_CONFIG)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
    return result


def dry_run(workdir: Path) -> tuple[dict[str, int], list[str]]:
    """A dry run of the target: (rule name -> job count, the jobs' outputs); ({}, []) when there
    is nothing to do."""
    result = snakemake(workdir, TARGET, "-n")
    out = result.stdout + result.stderr
    if "Nothing to be done" in out:
        return {}, []
    table = out.split("Job stats:", 1)[1]
    jobs = dict((name, int(n)) for name, n in re.findall(r"^(\w+)\s+(\d+)\s*$", table, flags=re.M))
    jobs.pop("total", None)
    return jobs, re.findall(r"^\s*output: (.+)$", out, flags=re.M)


@pytest.fixture(scope="module")
def workflow_dir(default_run, tmp_path_factory) -> Path:
    """A copy of the session's uninterrupted run (results, Snakemake's metadata, config; file
    times kept), which these tests may change."""
    work = tmp_path_factory.mktemp("workflow") / "run"
    shutil.copytree(default_run, work, symlinks=True)
    return work


def test_first_run_produces_policy_plan_and_shards(workflow_dir):
    policy = workflow_dir / "results" / "policy"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "prompts.jsonl", "optimizer.pt"):
        assert (policy / name).is_file(), name
    plan = {kind: read_json(workflow_dir / "results" / "plan" / f"{kind}.json") for kind in ("E", "U")}
    assert len(plan["E"]["prompt_ids"]) == 512 and len(plan["E"]["shards"]) == 2
    assert len(plan["U"]["prompt_ids"]) == 16 == len(set(plan["U"]["prompt_ids"])) and len(plan["U"]["shards"]) == 2
    for path in SHARDS:
        kind, index = path.split("/")[2], int(path[-15:-12])
        tensors, meta = read_shard(workflow_dir / path, expect={"batch_kind": kind, "shard_index": index})
        assert meta["G"] == 4 and meta["seed"] == 0
        assert meta["generation"] == {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 3}
        assert tensors["prompt_ids"].tolist() == plan[kind]["shards"][index]
        B = len(plan[kind]["shards"][index])
        assert tensors["sequences"].shape[:2] == (B, 4)
        assert tensors["rewards"].shape == (B, 4) and "advantages" not in tensors  # the update's business


def test_second_dry_run_has_nothing_to_do(workflow_dir):
    assert dry_run(workflow_dir) == ({}, [])


def test_a_deleted_shard_is_regenerated_alone_and_identically(workflow_dir):
    lost = workflow_dir / SHARDS[1]
    before, meta_before = read_shard(lost)
    kept = [workflow_dir / p for p in (SHARDS[0], SHARDS[2], SHARDS[3], "results/plan/E.json", "results/plan/U.json",
                                       "results/policy/model.safetensors")]
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    lost.unlink()

    jobs, outputs = dry_run(workflow_dir)
    assert jobs == {"rollout": 1, TARGET: 1}
    assert outputs == [SHARDS[1]]

    snakemake(workflow_dir, TARGET, "--cores", "2")
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes  # nothing else was rewritten
    after, meta_after = read_shard(lost)
    seconds = [meta["cost"].pop("seconds") for meta in (meta_before, meta_after)]  # the job's wall time
    assert all(s > 0 for s in seconds)
    assert meta_after == meta_before
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name


def test_lint(workflow_dir):
    result = snakemake(workflow_dir, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_inspector_prints_decoded_responses(workflow_dir):
    shard = workflow_dir / SHARDS[0]
    result = subprocess.run(
        [sys.executable, "-m", "entropy_probe", "inspect", str(shard),
         "--policy", str(workflow_dir / "results" / "policy"), "-n", "3"],
        cwd=workflow_dir, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    tensors, meta = read_shard(shard)
    prompts = [line for line in (workflow_dir / "results" / "policy" / "prompts.jsonl").read_text().splitlines() if line]
    first = yaml.safe_load(prompts[tensors["prompt_ids"][0].item()])["prompt"]
    assert f"'{first}'" in out  # the decoded prompt text
    assert "<eos>" in out  # decoded responses, EOS shown
    assert len(re.findall(r"^\s+response \d+: '", out, flags=re.M)) == 3
    assert "batch_kind: E" in out and "sequences" in out and "mean_rb_entropy_per_token" in out
    assert f"mean_reward: {tensors['rewards'].double().mean().item():.6g}" in out
