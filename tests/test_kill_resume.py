"""A run killed (SIGKILL of Snakemake and of its jobs) during the rollouts, the teacher forcing and
the statistics, then resumed, ends with the results of an uninterrupted run, recomputing only
what was lost and leaving no temporary file behind. The run goes as far as δH₁ and the SNIS ΔH
(the stages the kill points lie in, and what they feed), not through the report's other stages.
The small test config (.test/config/config.yaml), against the session's uninterrupted run of it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from workflow_util import json_numbers, run_snakemake

RUN_CONFIG = "config.yaml"

pytestmark = pytest.mark.workflow

# A job's log file appears when its script starts: kill then.
KILL_POINTS = ["rollout_E_001.log", "teacher_force_X_000.log", "snis_shard_001.log"]
TARGETS = ("results/delta_h1.json", "results/delta_h_snis.json")


def run_until_then_kill(work, log_name, timeout=600):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
           "--cores", "2", "--rerun-incomplete", *TARGETS, "--configfile", str(work / RUN_CONFIG)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = work / "results" / "logs" / log_name
    deadline = time.time() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"the workflow ended before {log_name} appeared"
        assert time.time() < deadline, f"{log_name} did not appear"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and every job it started
    proc.wait()


def results(work):
    """Every number of δH₁'s report (X·v, its SE, per η) and of the SNIS ΔH per η."""
    return [json_numbers(json.loads((work / target).read_text())) for target in TARGETS]


def test_killed_runs_resume_to_the_uninterrupted_results(tmp_path, test_config_run):
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(REPO / ".test" / "config" / "config.yaml", killed / RUN_CONFIG)
    for point in KILL_POINTS:
        run_until_then_kill(killed, point)
        run_snakemake(killed, RUN_CONFIG, "--unlock")  # the killed Snakemake left its lock
    policy_file = killed / "results" / "policy" / "model.safetensors"
    built = policy_file.stat().st_mtime_ns
    run_snakemake(killed, RUN_CONFIG, "--cores", "2", "--rerun-incomplete", *TARGETS)

    assert policy_file.stat().st_mtime_ns == built  # finished work is not redone
    assert results(killed) == results(test_config_run)  # the uninterrupted run
    leftovers = [p for p in (killed / "results").rglob("*") if ".tmp" in p.name]
    assert leftovers == []
