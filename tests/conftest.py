"""Shared fixtures, each built once per test session: the embedded tiny policy, real TRL runs on
it, and the Snakemake runs the workflow tests read (copy before changing): the default workflow
with RUN_SETTINGS (``default_run``), the README's quick start in a fresh copy of the repository
(``quickstart_run``) and the small test config (``test_config_run``). The reference commit's runs
of tests/test_numbers_unchanged.py start in the background as soon as the session is collected."""
from __future__ import annotations

import sys

import pytest
import torch

# The tiny models of the tests are dominated by per-op overhead: one thread is several times
# faster than two on the 2-core CI machine (and leaves a core to Snakemake subprocesses).
torch.set_num_threads(1)

from entropy_probe import models
from entropy_probe.toy import build_embedded_policy

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]

# The default config with enough E sequences for the checks against exact enumeration (2048 in 2
# shards: 512 prompt groups of G = 4), 16 U prompts in 2 U shards, three step sizes with central
# differences, and two update variants (dapo: its own objective and Y, and its SNIS ΔH; adamw: the main Y).
RUN_SETTINGS = {
    "batch_config": {"E_total_sequences": 2048, "G": 4, "B_U": 16, "E_num_shards": 2, "U_num_shards": 2},
    "estimator": {"eta_list": [1e-5, 1e-4, 1e-3], "central_difference": True},
    "update": {"variants": {"dapo": {"loss_type": "dapo", "snis": True}, "adamw": {"optimizer": "adamw", "lr_factor": 0.02}}},
}
RUN_CONFIG = "probe.yaml"


def write_run_config(work):
    """``work/probe.yaml``: the default config with RUN_SETTINGS."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for section, values in RUN_SETTINGS.items():
        config[section].update(values)
    work.mkdir(parents=True, exist_ok=True)
    (work / RUN_CONFIG).write_text(yaml.safe_dump(config))


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


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """A working directory where the whole workflow ran once, uninterrupted, with RUN_SETTINGS
    (about two minutes on 2 cores). Read-only: a test that changes files works on a copy."""
    from workflow_util import run_snakemake

    work = tmp_path_factory.mktemp("default_run")
    write_run_config(work)
    run_snakemake(work, RUN_CONFIG, "--cores", "2")
    return work


@pytest.fixture(scope="session")
def trl_run(toy_policy_dir, tmp_path_factory):
    """Four real TRL GRPOTrainer steps on the embedded policy (full model), a checkpoint after
    each (tests/trl_harness.py; about a second)."""
    pytest.importorskip("trl")
    from trl_harness import run_training

    return run_training(toy_policy_dir, tmp_path_factory.mktemp("trl_run"))


@pytest.fixture(scope="session")
def trl_lora_run(toy_policy_dir, tmp_path_factory):
    """The same run training a LoRA adapter (PEFT) instead of the full model."""
    pytest.importorskip("trl")
    from peft import LoraConfig
    from trl_harness import run_training

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")
    return run_training(toy_policy_dir, tmp_path_factory.mktemp("trl_lora_run"), peft_config=lora,
                        learning_rate=1e-3)


QUICKSTART_DIR = "ENTROPY_PROBE_QUICKSTART_DIR"


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """A fresh copy of the repository where the README's quick start ran (``snakemake --cores 2``:
    config/config.yaml, about five minutes on 2 cores). When $ENTROPY_PROBE_QUICKSTART_DIR names
    a fresh clone where it already ran (``.ci/run`` runs the README's commands first), that one,
    once a dry run there finds nothing left to do."""
    import os

    from workflow_util import fresh_copy, run_in

    given = os.environ.get(QUICKSTART_DIR)
    if given:
        work = __import__("pathlib").Path(given)
        out = run_in(work, "snakemake -n")
        assert "Nothing to be done" in out.stdout + out.stderr, f"{QUICKSTART_DIR}={given}: the quick start is not complete"
        return work
    work = fresh_copy(tmp_path_factory.mktemp("quickstart"))
    run_in(work, "snakemake --cores 2")
    return work


@pytest.fixture(scope="session")
def test_config_run(tmp_path_factory):
    """The small test workflow (.test/config/config.yaml), run whole once. Read-only."""
    import shutil

    from workflow_util import run_snakemake

    work = tmp_path_factory.mktemp("dot_test")
    shutil.copy(REPO / ".test" / "config" / "config.yaml", work / "config.yaml")
    run_snakemake(work, "config.yaml", "--cores", "2", timeout=1800)
    return work


def pytest_collection_finish(session):
    """The reference commit's runs (tests/test_numbers_unchanged.py) start now, in the background
    at the lowest priority, when that module's tests are selected: they use the cores the other
    tests leave idle."""
    module = sys.modules.get("test_numbers_unchanged")
    if module is not None and any(item.module is module for item in session.items):
        module.REFERENCE_RUNS.start()


def pytest_sessionfinish(session):
    module = sys.modules.get("test_numbers_unchanged")
    if module is not None:
        module.REFERENCE_RUNS.stop()
        __import__("shutil").rmtree(module.REFERENCE_RUNS.root.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def fsdp_run(toy_policy_dir, tmp_path_factory):
    """(output directory, the ranks' records) of a 3-step two-process FSDP2 Trainer run on the
    embedded policy (tests/fsdp_trainer_run.py under torchrun; about 20 s)."""
    import os
    import subprocess

    out = tmp_path_factory.mktemp("fsdp_run")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "tests" / "fsdp_trainer_run.py"), str(toy_policy_dir), str(out)],
                            capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, torch.load(out / "records.pt", weights_only=True)


ZERO_RUN = REPO / "tests" / "fixtures" / "deepspeed" / "run"


@pytest.fixture(scope="session")
def checkpoint_trajectories(fsdp_run, toy_policy_dir, tmp_path_factory):
    """"fsdp" / "zero" -> a working directory where the workflow ran a trajectory (one pair,
    1024 -> 64 E sequences) over the FSDP run's sharded checkpoints 1 and 2, and over the
    DeepSpeed ZeRO-2 fixture's checkpoints 2 and 3. The two run side by side, a core each (a
    pair's jobs form a chain)."""
    from concurrent.futures import ThreadPoolExecutor

    import yaml
    from workflow_util import run_snakemake

    checkpoints = {"fsdp": ([str(fsdp_run[0] / "checkpoint-1"), str(fsdp_run[0] / "checkpoint-2")],
                            str(toy_policy_dir)),
                   "zero": ([str(ZERO_RUN / "checkpoint-2"), str(ZERO_RUN / "checkpoint-3")], "embedded")}
    works = {}
    for kind, (listed, base) in checkpoints.items():
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        config["batch_config"].update({"E_total_sequences": 64, "G": 4, "B_U": 8, "E_num_shards": 1,
                                       "U_num_shards": 1})
        config["estimator"].update({"eta_list": [0.5], "fresh_etas": []})
        config["update"].update({"optimizer": "checkpoint_diff", "variants": {}})
        config["model"].update({"device": "cpu", "name_or_path": base, "checkpoints": listed})
        config["data"]["source"] = str(toy_policy_dir / "prompts.jsonl")
        works[kind] = tmp_path_factory.mktemp(f"{kind}_trajectory")
        (works[kind] / "probe.yaml").write_text(yaml.safe_dump(config))
    with ThreadPoolExecutor(len(works)) as pool:
        for done in [pool.submit(run_snakemake, work, "probe.yaml", "--cores", "1") for work in works.values()]:
            done.result()
    return works
