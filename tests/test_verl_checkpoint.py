"""verl actor checkpoints read in one process (entropy_probe.verl_checkpoint), from a fixture made
by verl 0.9.1's own FSDPCheckpointManager on a real two-process FSDP2 run
(tests/fixtures/verl/make_checkpoints.py; a full-parameter run and a LoRA run, three global steps
of two AdamW steps each): the weights and AdamW moments read by name equal what the ranks held,
gathered from their shards, exactly; nothing is unpickled beyond weights_only; bad folders fail
in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from entropy_probe import verl_checkpoint as V
from workflow_util import REPO, raises_one_line

FIXTURE = REPO / "tests" / "fixtures" / "verl"


def _names(run: str) -> list[str]:
    """The run's model's parameters in named_parameters() order (on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(FIXTURE / "base")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if run == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0))
    return [name for name, _ in model.named_parameters()]


@pytest.mark.parametrize("run", ["full", "lora"])
def test_weights_and_moments_by_name_are_what_the_ranks_held(run, monkeypatch):
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append((str(f), k.get("weights_only"))) or
                        original(f, *a, **k))
    records = original(FIXTURE / run / "records.pt", weights_only=True)
    names = _names(run)
    for step in (1, 2, 3):
        actor = V.actor_dir(FIXTURE / run / f"global_step_{step}")
        assert V.world_size(actor) == (2, 2)
        weights = V.model_state(actor)
        assert set(weights) == set(records["parameters"][step]) == set(names)
        for name, value in records["parameters"][step].items():
            assert torch.equal(weights[name], value), name
        saved = V.optimizer_state_dict(actor, names)
        assert set(saved["state"]) == set(records["moments"][step])  # LoRA: the adapter's, none of the frozen
        for name, moments in records["moments"][step].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(saved["state"][name][key], moments[key]), (name, key)
            assert float(saved["state"][name]["step"]) == 2 * step  # two optimizer steps per global step
        assert saved["param_groups"][0]["params"] == names and saved["param_groups"][0]["weight_decay"] == 0.01
    assert loads and all(w is True for _, w in loads) and not any("extra_state" in f for f, _ in loads)


def test_bad_verl_folders_fail_in_one_line(tmp_path):
    def one_line(call, *fragments):
        raises_one_line(V.VerlCheckpointError, call, *fragments)

    step = tmp_path / "global_step_1"
    shutil.copytree(FIXTURE / "full" / "global_step_1", step)
    actor = step / "actor"
    one_line(lambda: V.actor_dir(tmp_path), "no actor/ folder")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 4}))
    one_line(lambda: V.model_state(step), "world_size 4, but the rank files are of world size 2")
    (actor / "fsdp_config.json").unlink()  # an older verl: the world size from the file names
    assert V.world_size(actor) == (None, 2)
    (actor / "model_world_size_2_rank_1.pt").unlink()
    one_line(lambda: V.model_state(step), "model_world_size_2_rank_1.pt is missing (1 of 2 model files)")
    one_line(lambda: V.optimizer_state_dict(step, _names("full")[:-1]), "21 parameters in the optimizer, the model "
             "has 20", "actor.strategy: fsdp2")


def test_the_fixture_script_runs_where_verl_imports(tmp_path):
    pytest.importorskip("verl", reason="verl is not installed here (it pins an older transformers; the fixture was "
                                       "made in an environment of its own)")
    import subprocess
    import sys

    copy = tmp_path / "verl"
    copy.mkdir()
    shutil.copy(FIXTURE / "make_checkpoints.py", copy)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(copy / "make_checkpoints.py")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for run in ("full", "lora"):
        assert V.world_size(V.actor_dir(copy / run / "global_step_3")) == (2, 2)
