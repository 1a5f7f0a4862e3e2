"""A run killed (SIGKILL of Snakemake and of its jobs) during the rollouts, the teacher forcing and
the statistics, then resumed, ends with the results of an uninterrupted run, recomputing only
what was lost and leaving no temporary file behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from workflow_util import REPO, run_snakemake

pytestmark = pytest.mark.workflow

SMALL = {
    "batch_config": {"E_total_sequences": 64, "G": 4, "B_U": 8, "E_num_shards": 2, "U_num_shards": 2},
    "estimator": {"eta_list": [1e-4, 1e-3], "central_difference": False},
}
# A job's log file appears when its script starts: kill then.
KILL_POINTS = ["rollout_E_001.log", "teacher_force_X_000.log", "snis_shard_001.log"]


def write_config(work):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for section, values in SMALL.items():
        config[section].update(values)
    work.mkdir(parents=True, exist_ok=True)
    (work / "small.yaml").write_text(yaml.safe_dump(config))


def run_until_then_kill(work, log_name, timeout=600):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--cores", "2", "--rerun-incomplete", "--configfile", str(work / "small.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = work / "results" / "logs" / log_name
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the workflow ended before {log_name} appeared"
        assert time.time() < deadline, f"{log_name} did not appear"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and every job it started
    proc.wait()


def summary_numbers(work):
    summary = json.loads((work / "results" / "summary.json").read_text())
    return summary["rows"], summary["first_order"]["X_dot_v"], summary["delta_h"]["delta_h"]


def test_killed_runs_resume_to_the_uninterrupted_results(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    write_config(reference)
    run_snakemake(reference, "small.yaml", "--cores", "2")

    write_config(killed)
    for point in KILL_POINTS:
        run_until_then_kill(killed, point)
        run_snakemake(killed, "small.yaml", "--unlock")  # the killed Snakemake left its lock
    policy_file = killed / "results" / "policy" / "model.safetensors"
    built = policy_file.stat().st_mtime_ns
    run_snakemake(killed, "small.yaml", "--cores", "2", "--rerun-incomplete")

    assert policy_file.stat().st_mtime_ns == built  # finished work is not redone
    assert summary_numbers(killed) == summary_numbers(reference)
    leftovers = [p for p in (killed / "results").rglob("*") if ".tmp" in p.name]
    assert leftovers == []
