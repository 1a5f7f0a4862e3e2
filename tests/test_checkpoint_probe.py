"""Trainer checkpoints as the probe's input, below the workflow: the checkpoint files
read without torch, the config checks of model.checkpoint / update.next_checkpoint /
model.checkpoints, the optimizer-state check run before any job, the policy spec of a checkpoint,
v = θ_{t+1} − θ_t (checkpoint_diff), the AdamW v of a checkpoint with its training η, and the
training η on the sweep and in the report.

Real TRL GRPOTrainer runs (tests/conftest.py ``trl_run``, ``trl_lora_run``: four steps, a
checkpoint after each). The workflow over such a run: tests/test_trajectory_workflow.py.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")

from entropy_probe import checkpoint_step, model_config, models, report, shards, toy, update  # noqa: E402
from entropy_probe.config import ConfigError, load_config  # noqa: E402
from entropy_probe.sweep import sweep_etas, with_training_eta  # noqa: E402
from entropy_probe.trainer_checkpoint import (  # noqa: E402
    TrainerCheckpointError, check_state_fits, load_trainer_checkpoint, trainer_param_groups)
from entropy_probe.trainer_files import (  # noqa: E402
    pair_id, read_layout, run_checkpoints, safetensors_shapes, same_tensors)
from trl_harness import toy_trainer_state  # noqa: E402
from workflow_util import REPO  # noqa: E402


def _overrides(toy_policy_dir, model: dict, update_: dict | None = None) -> dict:
    return {"model": model, "data": {"source": str(toy_policy_dir / "prompts.jsonl")},
            "update": {"variants": {}} | (update_ or {})}  # the default config's variants need a U-batch v


def _config(toy_policy_dir, model: dict, update_: dict | None = None) -> dict:
    return load_config(REPO / "config" / "config.yaml", _overrides(toy_policy_dir, model, update_))


def _config_error(toy_policy_dir, model: dict, update_: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        _config(toy_policy_dir, model, update_)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------ files, no torch


def test_checkpoint_files_are_read_without_loading(trl_run, trl_lora_run):
    layouts = run_checkpoints(str(trl_run.output_dir / "checkpoint-*"))
    assert [c.global_step for c in layouts] == [1, 2, 3, 4]
    assert all(c.kind == "model" and c.optimizer and c.scheduler and c.trainer_state for c in layouts)
    assert pair_id(layouts[0], layouts[1]) == "checkpoint-1_to_checkpoint-2"
    # a list in any order, globs and repeats: training order, each once
    mixed = [str(trl_run.checkpoint(3)), str(trl_run.output_dir / "checkpoint-[12]"), str(trl_run.checkpoint(3))]
    assert [c.global_step for c in run_checkpoints(mixed)] == [1, 2, 3]
    # the safetensors header is the model's state dict, shape for shape
    from safetensors.torch import load_file

    saved = load_file(str(trl_run.checkpoint(2) / "model.safetensors"))
    assert safetensors_shapes(trl_run.checkpoint(2) / "model.safetensors") == {k: tuple(v.shape)
                                                                               for k, v in saved.items()}
    assert same_tensors(layouts[0], layouts[1]) is None
    lora = read_layout(trl_lora_run.checkpoint(2))
    assert lora.kind == "adapter" and lora.base_model and "adapter_model.safetensors" in " ".join(lora.input_files())
    assert same_tensors(layouts[1], lora) == f"{lora.path} is a PEFT adapter, {layouts[1].path} a full model"


def test_parse_time_checkpoint_code_is_torch_free(trl_run, toy_policy_dir):
    overrides = _overrides(toy_policy_dir, {"checkpoints": str(trl_run.output_dir / "checkpoint-*")},
                           {"optimizer": "checkpoint_diff"})
    code = (
        "import sys\n"
        "from entropy_probe.config import load_config\n"
        "from entropy_probe.model_config import state_checks, trajectory_pairs\n"
        f"config = load_config({str(REPO / 'config' / 'config.yaml')!r}, {overrides!r})\n"
        "assert len(trajectory_pairs(config)) == 3 and state_checks(config)\n"
        "assert 'torch' not in sys.modules, 'torch imported at parse time'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------- config checks


def test_checkpoint_configs(trl_run, trl_lora_run, toy_policy_dir):
    full, lora = str(trl_run.checkpoint(2)), str(trl_lora_run.checkpoint(2))
    config = _config(toy_policy_dir, {"checkpoint": full}, {"optimizer": "adamw"})
    assert not model_config.is_embedded(config["model"])
    assert model_config.state_checks(config) == ["--trainable", "auto", full]
    config = _config(toy_policy_dir, {"checkpoint": lora}, {"optimizer": "checkpoint_diff",
                                                             "next_checkpoint": str(trl_lora_run.checkpoint(3))})
    assert model_config.compares_steps(config)
    pairs = model_config.trajectory_pairs(_config(
        toy_policy_dir, {"checkpoints": [str(trl_run.checkpoint(s)) for s in (3, 1, 2)]},
        {"optimizer": "checkpoint_diff"}))
    assert list(pairs) == ["checkpoint-1_to_checkpoint-2", "checkpoint-2_to_checkpoint-3"]
    second = pairs["checkpoint-2_to_checkpoint-3"]
    assert (second["model"]["checkpoint"], second["update"]["next_checkpoint"]) == (
        str(trl_run.checkpoint(2)), str(trl_run.checkpoint(3)))
    assert second["model"]["checkpoints"] == ""


def test_checkpoint_config_errors_name_the_key(trl_run, trl_lora_run, toy_policy_dir, tmp_path):
    full, lora, nxt = str(trl_run.checkpoint(2)), str(trl_lora_run.checkpoint(2)), str(trl_run.checkpoint(3))
    diff = {"optimizer": "checkpoint_diff", "next_checkpoint": nxt}
    cases = [
        ({"checkpoint": full}, {"optimizer": "checkpoint_diff"}, "update.next_checkpoint: update.optimizer"),
        ({}, {"optimizer": "checkpoint_diff"}, "update.optimizer: checkpoint_diff needs model.checkpoint"),
        ({"checkpoint": full}, {"next_checkpoint": nxt}, "update.next_checkpoint is set but update.optimizer is 'sgd'"),
        ({"checkpoint": full}, {"optimizer": "adamw", "variants": {"d": {"optimizer": "checkpoint_diff"}}},
         "update.variants.d.optimizer: 'checkpoint_diff' is not one of ['sgd', 'adamw']"),
        ({"checkpoint": full, "name_or_path": str(toy_policy_dir)}, {}, "model.name_or_path: model.checkpoint"),
        ({"checkpoint": full, "adapter_path": lora}, {}, "model.adapter_path: with model.checkpoint"),
        ({"checkpoint": full, "trainable": "adapters"}, {}, "model.trainable: 'adapters' but model.checkpoint"),
        ({"checkpoint": full}, {"optimizer": "adamw", "optimizer_state": full + "/optimizer.pt"},
         "update.optimizer_state: with model.checkpoint the AdamW state is the checkpoint's optimizer.pt"),
        ({"checkpoint": full}, diff | {"next_checkpoint": str(trl_run.checkpoint(1))},
         "update.next_checkpoint: '" + str(trl_run.checkpoint(1)) + "' is global step 1, not after"),
        ({"checkpoint": full}, diff | {"next_checkpoint": str(trl_lora_run.checkpoint(3))},
         f"update.next_checkpoint: does not fit model.checkpoint: {trl_lora_run.checkpoint(3)} is a PEFT adapter"),
        ({"checkpoint": str(tmp_path)}, {}, "model.checkpoint: " + str(tmp_path) + ": neither a PEFT adapter"),
        ({"checkpoints": str(trl_run.output_dir / "checkpoint-*")}, {"optimizer": "adamw"},
         "update.optimizer: a trajectory (model.checkpoints) probes each step the trainer took"),
        ({"checkpoints": str(tmp_path / "checkpoint-*")}, diff | {"next_checkpoint": ""},
         "model.checkpoints: '" + str(tmp_path / "checkpoint-*") + "' matches no directory"),
        ({"checkpoints": [full]}, diff | {"next_checkpoint": ""}, "model.checkpoints: 1 checkpoint(s) found"),
        ({"checkpoints": [full, nxt], "checkpoint": full}, diff, "model.checkpoint: model.checkpoints (a trajectory)"),
    ]
    for model, update_, expected in cases:
        message = _config_error(toy_policy_dir, model, update_)
        assert expected in message, (expected, message)
    # another model's weights as the next checkpoint: the first differing tensor, from the headers
    other = tmp_path / "checkpoint-3"
    shutil.copytree(trl_run.checkpoint(3), other)
    toy.build_model(seed=1, hidden_size=32).save_pretrained(other)
    message = _config_error(toy_policy_dir, {"checkpoint": full}, diff | {"next_checkpoint": str(other)})
    assert ("update.next_checkpoint: does not fit model.checkpoint: tensor 'lm_head.weight' has shape (14, 32)"
            in message)
    # the embedded prompts only go with the embedded policy
    with pytest.raises(ConfigError, match="data.source: 'embedded' prompts only go with the embedded policy"):
        load_config(REPO / "config" / "config.yaml", {"model": {"checkpoint": full}})


def test_variants_with_a_checkpoint_difference_are_skipped_with_a_note(trl_run, toy_policy_dir):
    """A variant is another update rule on the U batch; v = θ_next − θ has none: the variants are
    skipped, said in one line, never an error."""
    from entropy_probe import variants

    config = load_config(REPO / "config" / "config.yaml", {
        "model": {"checkpoint": str(trl_run.checkpoint(2))}, "data": {"source": str(toy_policy_dir / "prompts.jsonl")},
        "update": {"optimizer": "checkpoint_diff", "next_checkpoint": str(trl_run.checkpoint(3)),
                   "variants": {"dapo": {"loss_type": "dapo"}}}})
    assert variants.configured(config) == ["dapo"] and variants.names(config) == []
    note = variants.skipped_note(config)
    assert note.startswith("update.variants (dapo) skipped") and "checkpoint_diff" in note and "\n" not in note


# ----------------------------------------------------- the optimizer-state check before any job


def _state_of_another_model(tmp_path, source_dir, hidden_size=32, frozen=()):
    """A copy of ``source_dir`` whose optimizer.pt is a Trainer-grouped AdamW state of a toy model
    (another hidden size, or the same model trained with the parameters ``frozen``)."""
    copy = tmp_path / source_dir.name
    shutil.copytree(source_dir, copy)
    torch.save(toy_trainer_state(hidden_size, frozen), copy / "optimizer.pt")
    return copy


def test_the_state_check_before_any_job(trl_run, trl_lora_run, tmp_path, monkeypatch):
    loads = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or original(*a, **k))
    for step in (1, 4):
        model = models.load_policy(trl_run.checkpoint(step), "float32", "cpu")
        assert check_state_fits(trl_run.checkpoint(step)) == trainer_param_groups(model)
    names = check_state_fits(trl_lora_run.checkpoint(2))
    assert len(names[0]) == 8 and not names[1]
    assert loads and all(w is True for w in loads)
    other = _state_of_another_model(tmp_path / "a", trl_run.checkpoint(2))
    with pytest.raises(TrainerCheckpointError, match=r"optimizer\.pt: state tensor 0 .*\(14, 32\).*"
                                                     r"'model\.embed_tokens\.weight' of shape \(14, 48\)"):
        check_state_fits(other)
    frozen = _state_of_another_model(tmp_path / "b", trl_run.checkpoint(2), 48, ("model.embed_tokens.weight",))
    with pytest.raises(TrainerCheckpointError, match=r"state tensor 0 .*\(48, 48\).*'model\.embed_tokens\.weight'"):
        check_state_fits(frozen)
    with pytest.raises(TrainerCheckpointError, match=r"\(4, 48\), but the Trainer's order puts "
                                                     r"'base_model\.model\.model\.embed_tokens\.weight'"):
        check_state_fits(trl_lora_run.checkpoint(2), trainable="all")
    # the command the workflow runs at its start: one ERROR line, status 1
    result = subprocess.run([sys.executable, "-m", "entropy_probe", "check-checkpoints", str(trl_run.checkpoint(1)),
                             str(other)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
    assert errors == [line for line in result.stderr.splitlines() if "optimizer.pt" in line] and len(errors) == 1
    assert errors[0].startswith(f"ERROR: {other / 'optimizer.pt'}: state tensor 0"), result.stderr


# -------------------------------------------------------------------- policy spec, v, training η


def _spec(tmp_path, checkpoint, name="policy.json", **model):
    spec = models.resolve_spec({"name_or_path": "embedded", "adapter_path": "", "trust_remote_code": False,
                                "checkpoint": str(checkpoint)} | model)
    shards.write_json(tmp_path / name, spec)
    return spec


def test_policy_spec_of_a_checkpoint(trl_run, trl_lora_run, toy_policy_dir, tmp_path):
    lr_of_step = {e["step"]: e["learning_rate"] for e in trl_run.log_history if "learning_rate" in e}
    spec = _spec(tmp_path, trl_run.checkpoint(2))
    assert spec["model_dir"] == str(trl_run.checkpoint(2).resolve()) and spec["adapter_dir"] == ""
    assert spec["checkpoint"]["global_step"] == 2 and spec["checkpoint"]["kind"] == "model"
    assert spec["checkpoint"]["learning_rate"] == pytest.approx(lr_of_step[3], rel=1e-12)  # the next step's
    lora = _spec(tmp_path, trl_lora_run.checkpoint(2), "lora.json")
    assert lora["adapter_dir"] == str(trl_lora_run.checkpoint(2).resolve())
    assert lora["model_dir"] == str(toy_policy_dir.resolve())
    model = models.load_policy(tmp_path / "lora.json", "float32", "cpu")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(
        check_state_fits(trl_lora_run.checkpoint(2))[0])


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_checkpoint_diff_is_the_step_the_trainer_took(kind, trl_run, trl_lora_run, tmp_path):
    run = {"full": trl_run, "lora": trl_lora_run}[kind]
    spec = tmp_path / "policy.json"
    _spec(tmp_path, run.checkpoint(2))
    cfg = {"model": {"dtype": "float32", "trainable": "auto", "param_filter": ""}}
    v, meta = checkpoint_step.step_vector(cfg, str(spec), str(run.checkpoint(3)))
    before = dict(models.load_policy(spec, "float32", "cpu").named_parameters())
    after_spec = checkpoint_step.next_spec(models.read_spec(spec), run.checkpoint(3))
    after = dict(models.load_policy(after_spec, "float32", "cpu").named_parameters())
    trainable = {n for n, p in before.items() if p.requires_grad}
    assert set(v) == trainable and len(trainable) == (21 if kind == "full" else 8)
    for name in v:
        assert torch.equal(before[name].double() + v[name], after[name].double()), name  # exact in float64
    assert meta["training_eta"] == 1.0 and meta["next_global_step"] == 3 and meta["steps_between"] == 1
    assert meta["training_eta_label"] == "trainer's step (η = 1)" and meta["checkpoint"]["global_step"] == 2
    assert meta["step_norm"] > 0
    if kind == "full":  # a parameter the trainer changed but the probe leaves out: not the whole step
        with pytest.raises(checkpoint_step.CheckpointStepError, match="parameter 'model.embed_tokens.weight' "
                                                                      "differs from model.checkpoint's"):
            checkpoint_step.step_vector({"model": cfg["model"] | {"param_filter": "layers"}}, str(spec),
                                        str(run.checkpoint(3)))


def test_adamw_from_a_checkpoint_records_the_training_lr(trl_run, tmp_path):
    """v of update.optimizer adamw with model.checkpoint: the checkpoint's state in the Trainer's
    order (no names file), η = the next step's learning rate, and lr·v with the trainer's own
    (clipped) gradient of that step is the step it took."""
    from entropy_probe.update_builder import UpdateBuilder

    spec = _spec(tmp_path, trl_run.checkpoint(2))
    cfg = {"model": {"dtype": "float32", "trainable": "auto", "name_or_path": "embedded"},
           "update": {"optimizer": "adamw", "max_grad_norm": 0.0, "optimizer_state": "", "optimizer_param_names": ""}}
    build = UpdateBuilder(cfg, str(tmp_path / "policy.json"), spec["fingerprint"])
    Y = {n: -g for n, g in trl_run.steps[2].gradient.items()}  # step 3's clipped gradient
    v = build(Y)
    assert build.meta["training_eta"] == build.meta["training_lr"] == spec["checkpoint"]["learning_rate"]
    assert build.meta["training_eta_label"] == "training lr" and "(parameter order)" in build.meta[
        "optimizer_param_names"]
    step, _ = checkpoint_step.step_vector({"model": cfg["model"] | {"trainable": "auto", "param_filter": ""}},
                                          str(tmp_path / "policy.json"),
                                          str(trl_run.checkpoint(3)))
    lr = build.meta["training_lr"]
    compared = checkpoint_step.compare_steps(v, lr, step)
    assert compared["cosine"] == pytest.approx(1.0, abs=1e-6) and compared["norm_ratio"] == pytest.approx(1, rel=1e-4)
    assert compared["sign_agreement"] > 0.99
    expected = update.adamw_direction(Y, {n: p.detach() for n, p in models.load_policy(
        tmp_path / "policy.json", "float32", "cpu").named_parameters()}, load_trainer_checkpoint(
        trl_run.checkpoint(2), models.load_policy(tmp_path / "policy.json", "float32", "cpu")).state.per_param)
    assert all(torch.equal(v[n], expected[n]) for n in v)


def test_the_training_eta_joins_the_sweep_and_is_marked():
    assert with_training_eta([1e-4, 1e-3], 3e-4) == [1e-4, 3e-4, 1e-3]
    assert with_training_eta([1e-4, 1e-3], 1e-3 * (1 + 1e-12)) == [1e-4, 1e-3]  # already there
    assert with_training_eta([1e-4], None) == [1e-4]
    assert sweep_etas({"eta_list": [0.5], "central_difference": True}, 1.0) == [-1.0, -0.5, 0.5, 1.0]
    update_ = {"optimizer": "checkpoint_diff", "training_eta": 1.0, "training_eta_label": "trainer's step (η = 1)",
               "next_checkpoint": "/run/checkpoint-3", "next_global_step": 3, "steps_between": 1,
               "checkpoint": {"path": "/run/checkpoint-2", "kind": "model", "global_step": 2, "learning_rate": 1e-4,
                              "learning_rate_source": "scheduler.pt"}}
    first_order = {"update": update_, "delta_h1": [{"eta": e, "delta_h1": -e, "se": 0.1 * e} for e in (0.5, 1.0)]}
    snis = {"rows": [{"eta": e, "delta_h": -1.1 * e, "se": 0.1, "ess": 100.0, "num_sequences": 128,
                      "own_nucleus_differs_share": 0.0, "log_weight_min": 0.0, "log_weight_max": 0.1}
                     for e in (0.5, 1.0)]}
    rows = report.combine(first_order, snis, None)
    assert [r.get("training") for r in rows] == [None, "trainer's step (η = 1)"]
    comparison = {"cosine": 0.5, "norm_ratio": 1.1, "sign_agreement": 0.7, "probe_delta_h1": -0.2}
    table = report.format_table(rows, "nats/token", notes=[report.update_note(update_, comparison)])
    assert [line.split()[0] for line in table.splitlines() if line.split()[0] in ("0.5", "1*")] == ["0.5", "1*"]
    assert "η = 1 is that step" in table and "cosine 0.500, norm ratio 1.100" in table
    assert "global step 2" in table and "learning rate: 0.0001 (scheduler.pt)" in table


def test_the_trl_example_config(trl_run):
    """config/examples/trl-grpo-run.yaml passes the schema, and the cross-field checks with its
    checkpoints pointed at a real TRL run's output folder."""
    import yaml

    from entropy_probe.config import check_config
    from entropy_probe.config_schema import fill_defaults, validate

    example = yaml.safe_load((REPO / "config" / "examples" / "trl-grpo-run.yaml").read_text())
    fill_defaults(example)
    validate(example)
    assert example["update"]["optimizer"] == "checkpoint_diff" and example["model"]["checkpoints"].endswith("-*")
    example["model"].update(checkpoints=str(trl_run.output_dir / "checkpoint-*"), device="cpu")
    check_config(example)
    assert len(model_config.trajectory_pairs(example)) == 3
