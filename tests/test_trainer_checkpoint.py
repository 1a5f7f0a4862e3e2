"""Reading real TRL GRPOTrainer checkpoints (entropy_probe.trainer_checkpoint) and reproducing the
optimizer step the trainer took from each (DESIGN §2 "Y and v").

The runs (tests/conftest.py ``trl_run``, ``trl_lora_run``): four ``train()`` steps on the embedded
policy, torch AdamW with weight decay (two param groups), linear learning-rate decay, clipping,
a checkpoint after every step, each step's micro-batches and clipped gradient recorded.
"""
from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("trl")

import trl_harness as H  # noqa: E402
from entropy_probe import losses, update  # noqa: E402
from entropy_probe.trainer_checkpoint import (  # noqa: E402
    TrainerCheckpointError, layout_of, learning_rate, load_trainer_checkpoint, trainer_param_groups)

STEPS = (1, 2, 3)  # checkpoints t whose next step t + 1 the run recorded


def _load_model(run, step: int):
    """The checkpoint's model in float32 with the run's trainable parameters (PEFT: the adapter)."""
    from transformers import AutoModelForCausalLM

    files = layout_of(run.checkpoint(step))
    if files.kind == "model":
        return AutoModelForCausalLM.from_pretrained(files.path, dtype=torch.float32)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(files.base_model, dtype=torch.float32)
    return PeftModel.from_pretrained(base, files.path, is_trainable=True)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(params=["full", "lora"])
def run(request):
    return request.getfixturevalue({"full": "trl_run", "lora": "trl_lora_run"}[request.param])


def test_every_checkpoint_loads_without_a_names_file(run, monkeypatch):
    loads = []
    original = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((str(f), kwargs.get("weights_only")))
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    lr_logged = {e["step"]: e["learning_rate"] for e in run.log_history if "learning_rate" in e}
    for step in (1, 2, 3, 4):
        model = _load_model(run, step)
        ckpt = load_trainer_checkpoint(run.checkpoint(step), model)
        assert ckpt.layout.global_step == step
        assert ckpt.layout.kind == ("adapter" if hasattr(model, "peft_config") else "model")
        rate, source = learning_rate(ckpt.layout)
        assert "scheduler.pt" in source
        if step + 1 in lr_logged:  # scheduler.pt's rate is the one the next step used
            assert rate == pytest.approx(lr_logged[step + 1], rel=1e-12)
        assert ckpt.param_group_names == trainer_param_groups(model)
        assert set(ckpt.state.per_param) == set(_trainable(model))
        assert [g["weight_decay"] for g in ckpt.state.groups] == [0.1, 0.0]
        assert ckpt.state.steps == [float(step)]
    decay, no_decay = ckpt.param_group_names
    if ckpt.layout.kind == "model":
        assert len(no_decay) == 5 and all("norm" in n for n in no_decay) and len(decay) == 16
    else:
        assert no_decay == [] and len(decay) == 8 and all(".lora_" in n for n in decay)
    assert loads and all(weights_only is True for _, weights_only in loads)
    assert not any(path.endswith("training_args.bin") for path, _ in loads)


@pytest.mark.parametrize("step", STEPS)
def test_adamw_direction_from_a_checkpoint_is_the_step_the_trainer_took(run, step):
    """θ_t + lr_t · v = θ_{t+1}, v from checkpoint t's AdamW state and step t + 1's recorded
    (clipped) gradient g, i.e. Y = −g (compared in float64 at the float32 θ's resolution)."""
    model = _load_model(run, step)
    ckpt = load_trainer_checkpoint(run.checkpoint(step), model)
    theta = _trainable(model)
    after = _trainable(_load_model(run, step + 1))
    gradient = run.steps[step].gradient  # the step after checkpoint t (records are 0-based)
    assert set(gradient) == set(theta)
    v = update.adamw_direction({n: -g for n, g in gradient.items()}, theta, ckpt.state.per_param)
    lr, _ = learning_rate(ckpt.layout)
    moved = 0.0
    for name, t in theta.items():
        predicted = t.double() + lr * v[name]
        ulp = torch.finfo(torch.float32).eps * after[name].double().abs().clamp(min=1e-6)
        assert ((predicted - after[name].double()).abs() <= 2 * ulp + 1e-6 * lr * v[name].abs()).all(), name
        moved = max(moved, float((after[name] - t).abs().max()))
    assert moved > 1e-5  # the step is resolved, not lost in rounding


@pytest.mark.parametrize("step", STEPS)
def test_recorded_gradient_is_the_registry_objective(trl_run, step):
    """End to end through train(): the gradient TRL fed the optimizer at step t + 1 is −Y·clip,
    Y from losses.response_coefficients("dapo") on the micro-batches as TRL cut them (after its
    shuffle), at θ_t."""
    model = _load_model(trl_run, step)
    record = trl_run.steps[step]
    inputs = {k: torch.cat([mb[k] for mb in record.micro_batches]) for k in
              ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")}
    lengths = inputs["completion_mask"].sum(-1)
    coef = losses.response_coefficients("dapo", inputs["advantages"][None], lengths[None])
    Y = H.objective_gradient(model, inputs, coef.reshape(-1), H.TEMPERATURE)
    clip = update.clip_coefficient({n: -y for n, y in Y.items()}, 1.0)
    # both fp32 gradients, summed in other orders over cancelling advantages: their rounding reaches
    # 1e-4 relative on some CPUs; another loss type's objective is off by far more
    assert H.relative_error({n: -y * clip for n, y in Y.items()}, record.gradient) < 3e-4
    grpo = losses.response_coefficients("grpo", inputs["advantages"][None], lengths[None])
    Y_grpo = H.objective_gradient(model, inputs, grpo.reshape(-1), H.TEMPERATURE)
    assert H.relative_error({n: -y * clip for n, y in Y_grpo.items()}, record.gradient) > 1e-2


def _another_models_state(tmp_path, source_dir):
    """A copy of ``source_dir`` whose optimizer.pt is a Trainer-grouped AdamW state of a toy model
    with another hidden size."""
    copy = tmp_path / source_dir.name
    shutil.copytree(source_dir, copy)
    torch.save(H.toy_trainer_state(hidden_size=32), copy / "optimizer.pt")
    return copy


def _one_line_error(call, *fragments):
    with pytest.raises(TrainerCheckpointError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "optimizer.pt" in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_a_state_that_does_not_fit_the_model_is_an_error(trl_run, trl_lora_run, tmp_path):
    model = _load_model(trl_run, 2)
    other = _another_models_state(tmp_path, trl_run.checkpoint(2))
    _one_line_error(lambda: load_trainer_checkpoint(other, model),
                    str(other / "optimizer.pt"), "state tensor 0", "(14, 32)", "'model.embed_tokens.weight'")
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen: the decay group shifts by one
    _one_line_error(lambda: load_trainer_checkpoint(trl_run.checkpoint(2), model),
                    "state tensor 0", "(14, 48)", "'model.layers.0.self_attn.q_proj.weight'")
    model = _load_model(trl_run, 2)
    model.model.norm.weight.requires_grad_(False)  # frozen norm: same shapes, one fewer in group 1
    _one_line_error(lambda: load_trainer_checkpoint(trl_run.checkpoint(2), model),
                    "state tensor 20", "has no parameter", "4 trainable no-decay")
    lora = _load_model(trl_lora_run, 2)
    lora.base_model.model.lm_head.weight.requires_grad_(True)  # unfrozen: one more decay parameter
    _one_line_error(lambda: load_trainer_checkpoint(trl_lora_run.checkpoint(2), lora),
                    "param group 0 holds 8", "'base_model.model.lm_head.weight'")


def test_checkpoint_files_and_learning_rate_fallback(trl_run, tmp_path):
    copy = tmp_path / "checkpoint-3"
    shutil.copytree(trl_run.checkpoint(3), copy)
    (copy / "scheduler.pt").unlink()
    rate, source = learning_rate(layout_of(copy))
    logged = [e["learning_rate"] for e in trl_run.log_history if e.get("step") == 3 and "learning_rate" in e]
    assert rate == pytest.approx(logged[0]) and "trainer_state.json" in source
    (copy / "optimizer.pt").unlink()
    with pytest.raises(TrainerCheckpointError, match="no optimizer.pt"):
        layout_of(copy)
    with pytest.raises(TrainerCheckpointError, match="neither a PEFT adapter"):
        layout_of(tmp_path)
