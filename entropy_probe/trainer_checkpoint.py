"""An HF ``Trainer`` / TRL checkpoint directory ``checkpoint-N`` as the AdamW update's inputs
(DESIGN §2 "Y and v"): the model or PEFT adapter, the AdamW state mapped to parameter names with
no names file, the learning rate of the next step and the global step.

Files read: ``adapter_config.json`` (present: a PEFT adapter on ``base_model_name_or_path``;
absent: a full model, ``config.json`` + weights), ``optimizer.pt``, ``scheduler.pt``,
``trainer_state.json``. ``training_args.bin`` is a pickle and is never loaded; every
``torch.load`` is ``weights_only=True``.

**Parameter order.** ``Trainer.create_optimizer`` builds two param groups from the trainable
parameters (``requires_grad``) in ``model.named_parameters()`` order: group 0 the names in
``Trainer.get_decay_parameter_names(model)`` (weight decay ``args.weight_decay``), group 1 the
others (no decay). A torch ``state_dict`` numbers the parameters 0, 1, … through the groups in
that order. The model passed in must have the trainable parameters of the run (for a PEFT
checkpoint: the ``PeftModel`` with its adapter trainable). The rebuilt order is checked against
every saved tensor's shape and each group's size; a mismatch is a
:class:`TrainerCheckpointError` naming the file and the first mismatching tensor, never a guess.

**FSDP sharded checkpoints** (``pytorch_model_fsdp_0/``, ``optimizer_0/``: DCP folders, read by
:mod:`entropy_probe.dcp_files`) and **DeepSpeed ZeRO-1/2** ones (``global_stepN/``, joined by
:mod:`entropy_probe.zero_checkpoint`) save the optimizer state by parameter name, each param
group listing its names: the order needs no rebuilding, only checking that the names are the
model's trainable parameters, every one of them.

**Learning rate.** The Trainer steps the scheduler after every optimizer step, so ``scheduler.pt``
(``_last_lr``) in ``checkpoint-N`` holds the rate of step N + 1, the step this probe takes from
the checkpoint. Without ``scheduler.pt``, ``trainer_state.json``'s ``log_history`` gives the rate
step N used (the same only under a constant schedule); ``learning_rate_source`` says which.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import zero_checkpoint
from .dcp_files import optimizer_state_dict
from .input_files import EMBEDDED
from .optimizer_state import LoadedState, OptimizerStateError, load_adamw_state, read_state_dict
from .trainable import set_trainable, trainable_mode
from .trainer_files import (SCHEDULER_FILE, TRAINER_STATE_FILE, CheckpointFilesError, CheckpointLayout,
                            logged_learning_rates, read_layout)


NO_ARCHITECTURE = ("an FSDP sharded checkpoint saves no config.json: set model.name_or_path to the model the run "
                   "started from (its config and tokenizer)")


class TrainerCheckpointError(OptimizerStateError, CheckpointFilesError):
    """A Trainer checkpoint that cannot be read, or whose optimizer state does not fit the model."""


@dataclass
class TrainerCheckpoint:
    layout: CheckpointLayout
    param_group_names: list[list[str]]  # [decay names, no-decay names], the optimizer's order
    state: LoadedState  # AdamW state per parameter name (for the adamw update rule)


def _error(path: Path, message: str) -> TrainerCheckpointError:
    return TrainerCheckpointError(f"{path}: {message}")


def layout_of(checkpoint_dir: str | Path, require_optimizer: bool = True) -> CheckpointLayout:
    """:func:`entropy_probe.trainer_files.read_layout`, its errors as :class:`TrainerCheckpointError`."""
    try:
        return read_layout(checkpoint_dir, require_optimizer)
    except CheckpointFilesError as err:
        raise TrainerCheckpointError(str(err)) from err


def learning_rate(layout: CheckpointLayout) -> tuple[float | None, str]:
    """(the rate of step N + 1 from scheduler.pt, or step N's from the log history; its source)."""
    step = layout.global_step
    if layout.scheduler is not None:
        try:
            saved = torch.load(str(layout.scheduler), map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            raise _error(layout.scheduler, f"cannot load the scheduler state ({type(err).__name__}: {err})") from err
        rates = {float(r) for r in (saved.get("_last_lr") or [])} if isinstance(saved, dict) else set()
        if len(rates) != 1:
            raise _error(layout.scheduler, f"expected one learning rate in _last_lr, found {sorted(rates)}")
        return rates.pop(), f"{SCHEDULER_FILE} _last_lr (the rate of step {step + 1}, the next step)"
    try:
        logged = logged_learning_rates(layout)
    except CheckpointFilesError as err:
        raise TrainerCheckpointError(str(err)) from err
    if step in logged:
        return logged[step], (
            f"{TRAINER_STATE_FILE} log_history (the rate step {step} used; step {step + 1}'s only under a constant "
            "schedule)")
    return None, "none: no scheduler.pt and no learning_rate logged at this step"


def spec_entry(layout: CheckpointLayout) -> dict:
    """What the policy spec records about a trainer checkpoint (and v's header, the report): its
    path, kind, global step and the learning rate of the step after it, with its source."""
    rate, source = learning_rate(layout)
    return {"path": str(layout.path.resolve()), "kind": layout.kind, "global_step": layout.global_step,
            "learning_rate": rate, "learning_rate_source": source,
            "optimizer": str(layout.optimizer.resolve()) if layout.optimizer else ""}


def policy_sources(model_cfg: dict) -> tuple[str, str, str, dict]:
    """(model source, adapter source, its config key, the spec's ``checkpoint`` entry) of
    ``model.checkpoint``: a full model is the checkpoint itself; an adapter goes on
    ``model.name_or_path`` when that is set, else on adapter_config.json's base model; an FSDP
    sharded checkpoint's weights go into ``model.name_or_path``'s architecture. The entry
    records the global step and the learning rate of the next step (:func:`spec_entry`)."""
    layout = layout_of(model_cfg["checkpoint"], require_optimizer=False)
    entry = spec_entry(layout)
    if layout.kind == "model":
        return str(layout.path), "", "model.checkpoint", entry
    if layout.kind == "sharded":
        if model_cfg["name_or_path"] == EMBEDDED:
            raise TrainerCheckpointError(f"model.checkpoint: {layout.path}: {NO_ARCHITECTURE}")
        return model_cfg["name_or_path"], "", "model.name_or_path", entry
    if model_cfg["name_or_path"] != EMBEDDED:
        return model_cfg["name_or_path"], str(layout.path), "model.name_or_path", entry
    if not layout.base_model:
        raise TrainerCheckpointError(f"model.checkpoint: {layout.path}/adapter_config.json names no base model; "
                                     "set model.name_or_path")
    return (layout.base_model, str(layout.path), "model.checkpoint (adapter_config.json's base_model_name_or_path)",
            entry)


def trainer_param_groups(model: nn.Module) -> list[list[str]]:
    """[decay, no-decay] names of ``model``'s trainable parameters, ``named_parameters()`` order:
    ``Trainer.create_optimizer``'s grouping, by ``Trainer.get_decay_parameter_names``."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    return [[n for n in trainable if n in decay], [n for n in trainable if n not in decay]]


def match_parameter_order(saved: dict, path: Path, model: nn.Module) -> list[list[str]]:
    """The Trainer's parameter order for ``model``, checked against a saved optimizer state:
    two param groups, every saved exp_avg shaped like the parameter at its position, each group
    of the right size. The first mismatch is a :class:`TrainerCheckpointError`."""
    expected = trainer_param_groups(model)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    groups = saved["param_groups"]
    labels = ("decay", "no-decay")
    if len(groups) != len(expected):
        raise _error(path, f"{len(groups)} param groups; the Trainer builds {len(expected)} (decay, no-decay): "
                           "not an HF Trainer optimizer state")
    for i, (group, names) in enumerate(zip(groups, expected)):
        for position, pid in enumerate(group["params"]):
            entry = saved["state"].get(pid) or {}
            saved_shape = tuple(entry["exp_avg"].shape) if isinstance(entry.get("exp_avg"), Tensor) else None
            if position >= len(names):
                raise _error(path, f"state tensor {pid} (param group {i}, position {position}"
                                   f"{', shape ' + str(saved_shape) if saved_shape else ''}) has no parameter: the "
                                   f"model has {len(names)} trainable {labels[i]} parameters, the group "
                                   f"{len(group['params'])} (another model, or other trainable parameters)")
            if saved_shape is not None and saved_shape != shapes[names[position]]:
                raise _error(path, f"state tensor {pid} (param group {i}, position {position}) has shape "
                                   f"{saved_shape}, but the Trainer's order puts {names[position]!r} of shape "
                                   f"{shapes[names[position]]} there (another model, or other trainable parameters)")
        if len(names) > len(group["params"]):
            raise _error(path, f"param group {i} holds {len(group['params'])} parameters, the model has "
                               f"{len(names)} trainable {labels[i]} parameters; the first without state is "
                               f"{names[len(group['params'])]!r} (other trainable parameters than in training)")
    return expected


def match_named_groups(saved: dict, path: Path, model: nn.Module) -> list[list[str]]:
    """The param groups' names of a state saved by name, checked to be ``model``'s trainable
    parameters, every one of them (a :class:`TrainerCheckpointError` naming the first that is not)."""
    names = [list(group["params"]) for group in saved["param_groups"]]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    listed = [n for group in names for n in group]
    known, saved_names = set(trainable), set(listed)
    for name in listed:
        if name not in known:
            raise _error(path, f"the optimizer state names {name!r}, which is not a trainable parameter of the model "
                               "(another model, or other trainable parameters than in training: model.trainable)")
    missing = [n for n in trainable if n not in saved_names]
    if missing:
        raise _error(path, f"the model's trainable parameter {missing[0]!r} has no optimizer state ({len(missing)} "
                           "without; other trainable parameters than in training: model.trainable)")
    return names


def _saved_optimizer(layout: CheckpointLayout, model: nn.Module, mmap: bool = False) -> tuple[dict, list[list[str]]]:
    """(the optimizer's state_dict, its param groups' names for ``model``), by the layout's kind."""
    if layout.optimizer_format in ("dcp", "zero"):
        read = optimizer_state_dict if layout.optimizer_format == "dcp" else zero_checkpoint.optimizer_state_dict
        saved = read(layout.optimizer)
        return saved, match_named_groups(saved, layout.optimizer, model)
    saved = read_state_dict(layout.optimizer, mmap=mmap)
    return saved, match_parameter_order(saved, layout.optimizer, model)


def load_trainer_checkpoint(checkpoint_dir: str | Path, model: nn.Module) -> TrainerCheckpoint:
    """The checkpoint's files, the optimizer's parameter order rebuilt for ``model`` (the model of
    the checkpoint, with the run's trainable parameters) and its AdamW state by name."""
    layout = layout_of(checkpoint_dir)
    saved, names = _saved_optimizer(layout, model)
    state = load_adamw_state(str(layout.optimizer), names, dict(model.named_parameters()), state_dict=saved)
    return TrainerCheckpoint(layout, names, state)


def skeleton_model(checkpoint_dir: str | Path, trainable: str = "auto", base_model: str | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    """The checkpoint's model with no weights (``meta`` tensors: names, shapes, module types and
    ``requires_grad`` only), with the trainable parameters of ``model.trainable``: enough for the
    Trainer's grouping and the shape checks, in seconds whatever the model's size. An adapter
    checkpoint is put on its base (``base_model``, default adapter_config.json's) as PEFT does."""
    from transformers import AutoConfig, AutoModelForCausalLM

    layout = layout_of(checkpoint_dir, require_optimizer=False)
    source = str(layout.path) if layout.kind == "model" else (base_model or layout.base_model)
    if not source:
        raise _error(layout.path, "adapter_config.json names no base_model_name_or_path; set model.name_or_path"
                     if layout.kind == "adapter" else NO_ARCHITECTURE)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            if layout.kind == "adapter":
                from peft import PeftConfig, get_peft_model

                adapter = PeftConfig.from_pretrained(str(layout.path))
                adapter.inference_mode = False
                model = get_peft_model(model, adapter)
    except Exception as err:  # config or remote-code errors come in many types
        raise _error(layout.path, f"cannot build the model of this checkpoint ({type(err).__name__}: {err})") from err
    set_trainable(model, trainable_mode(trainable, layout.kind == "adapter"), str(layout.path))
    return model


def check_state_fits(checkpoint_dir: str | Path, trainable: str = "auto", base_model: str | None = None,
                     trust_remote_code: bool = False) -> list[list[str]]:
    """Check, before any job runs, that the checkpoint's optimizer.pt is an AdamW state that fits
    its model with ``model.trainable``'s parameters (the checks of :func:`load_trainer_checkpoint`,
    on a weightless model, the state memory-mapped). Returns the Trainer's name groups."""
    layout = layout_of(checkpoint_dir)
    model = skeleton_model(layout.path, trainable, base_model, trust_remote_code)
    saved, names = _saved_optimizer(layout, model, mmap=True)
    load_adamw_state(str(layout.optimizer), names, dict(model.named_parameters()), state_dict=saved)
    return names
