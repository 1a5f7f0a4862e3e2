"""Which device a job uses: model.device checked in the job (not at parse time), and on a host
with several GPUs each job takes one that no other job of the host holds."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from entropy_probe import models

HOLD = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_lock(path, seconds):
    """Another process (another job) holding the lock file ``path`` for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def fresh_claim(monkeypatch):
    monkeypatch.setattr(models, "_CLAIMED", {})


def test_a_job_takes_the_first_gpu_no_other_job_holds(tmp_path, fresh_claim):
    other = hold_lock(tmp_path / "entropy-probe-gpu-GPU-a.lock", 30)
    try:
        assert models.claim_gpu(["GPU-a", "GPU-b", "GPU-c"], tmp_path) == 1
        assert models.claim_gpu(["GPU-a", "GPU-b", "GPU-c"], tmp_path) == 1  # kept for the job's life
        # a third job now finds a and b taken
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from entropy_probe import models; "
             f"print(models.claim_gpu(['GPU-a', 'GPU-b', 'GPU-c'], {str(tmp_path)!r}))"],
            capture_output=True, text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr
        assert probe.stdout.strip() == "2"
    finally:
        other.kill()
        other.wait()


def test_a_job_waits_while_every_gpu_is_held_and_takes_the_freed_one(tmp_path, fresh_claim):
    others = [hold_lock(tmp_path / "entropy-probe-gpu-GPU-a.lock", 30),
              hold_lock(tmp_path / "entropy-probe-gpu-GPU-b.lock", 1.0)]
    try:
        start = time.monotonic()
        assert models.claim_gpu(["GPU-a", "GPU-b"], tmp_path, poll_seconds=0.05) == 1
        assert time.monotonic() - start >= 0.5  # it waited for b's holder to exit
    finally:
        for proc in others:
            proc.kill()
            proc.wait()


def test_cuda_requested_without_a_gpu_fails_in_the_job_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a job on a host without CUDA
    with pytest.raises(models.PolicyLoadError, match="model.device: 'cuda' requested"):
        models.pick_device("cuda")
    assert models.pick_device("auto") == torch.device("cpu")
