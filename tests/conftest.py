"""Shared fixtures: the embedded tiny policy, built once per test session (a few seconds)."""
from __future__ import annotations

import pytest
import torch

# The tiny models of the tests are dominated by per-op overhead: one thread is several times
# faster than two on the 2-core CI machine (and leaves a core to Snakemake subprocesses).
torch.set_num_threads(1)

from entropy_probe import models
from entropy_probe.toy import build_embedded_policy

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_policy_dir(tmp_path_factory):
    """A trained embedded policy (default toy settings) in a temporary directory."""
    out = tmp_path_factory.mktemp("toy_policy")
    build_embedded_policy(out, seed=0)
    return out


@pytest.fixture(scope="session")
def toy_model(toy_policy_dir):
    """(model, tokenizer) of the embedded policy, fp32, CPU, eval mode."""
    return models.load_policy(toy_policy_dir, "float32", "cpu"), models.load_tokenizer(toy_policy_dir)
