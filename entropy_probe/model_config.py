"""The ``model`` section and the trainer-checkpoint keys, checked before any job runs, and the
trajectory's pairs.

- ``model.name_or_path`` / ``model.adapter_path``: local directories that look like a checkpoint
  and a PEFT adapter, or hub ids (fetched by the policy_spec job); ``model.trainable: adapters``
  needs an adapter.
- ``model.checkpoint``: an HF Trainer / TRL ``checkpoint-N`` directory, the policy. A full model is
  the checkpoint itself (``model.name_or_path`` stays unset); a PEFT adapter goes on
  ``model.name_or_path`` when set, else on adapter_config.json's ``base_model_name_or_path``.
  With ``update.optimizer: adamw`` the AdamW state is the checkpoint's ``optimizer.pt``, its
  parameter order rebuilt from the Trainer's grouping (no names file:
  :mod:`entropy_probe.trainer_checkpoint`).
- ``update.optimizer: checkpoint_diff`` with ``update.next_checkpoint``: v = θ_next − θ over the
  trainable parameters, so that η = 1 is the step the trainer took.
- ``model.checkpoints``: a glob or a list of a run's checkpoints (a *trajectory*): one probe per
  consecutive pair (t, t+1), each the config above with ``model.checkpoint`` = t,
  ``update.next_checkpoint`` = t+1 and ``update.optimizer: checkpoint_diff``, its stages under
  ``results/pairs/<t>_to_<t+1>/``.

Torch-free (the Snakefile calls this while it parses); what needs torch — whether an optimizer
state fits its model — is checked by :func:`entropy_probe.trainer_checkpoint.check_state_fits`
when the workflow starts, before any job (:func:`state_checks`).
"""
from __future__ import annotations

import copy
from pathlib import Path

from .errors import ConfigError
from .input_files import EMBEDDED, check_checkpoint_path, check_torch_save_file, looks_like_hub_id
from .trainer_files import CheckpointFilesError, CheckpointLayout, pair_id, read_layout, run_checkpoints, same_tensors

CHECKPOINT_DIFF = "checkpoint_diff"


def is_embedded(model: dict) -> bool:
    """Whether the policy is the embedded one the workflow builds (no checkpoint configured)."""
    return model["name_or_path"] == EMBEDDED and not model.get("checkpoint") and not model.get("checkpoints")


def is_trajectory(config: dict) -> bool:
    return bool(config["model"].get("checkpoints"))


def _layout(value: str, key: str, require_optimizer: bool = False) -> CheckpointLayout:
    try:
        return read_layout(value, require_optimizer)
    except CheckpointFilesError as err:
        raise ConfigError(f"{key}: {err}") from err


def _check_base(value: str, key: str) -> None:
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: the base model {value!r} has no config.json")
    elif not looks_like_hub_id(value):
        raise ConfigError(f"{key}: the base model {value!r} is not an existing directory (hub ids look like 'org/name')")


def _check_single(config: dict) -> None:
    """``model.checkpoint`` and ``update.next_checkpoint`` of one probe."""
    model, update = config["model"], config["update"]
    optimizer, checkpoint, following = update["optimizer"], model.get("checkpoint"), update.get("next_checkpoint")
    if following and optimizer != CHECKPOINT_DIFF:
        raise ConfigError(f"update.next_checkpoint is set but update.optimizer is {optimizer!r}; it only applies to "
                     f"{CHECKPOINT_DIFF}")
    if optimizer == CHECKPOINT_DIFF and not checkpoint:
        raise ConfigError(f"update.optimizer: {CHECKPOINT_DIFF} needs model.checkpoint (the trainer checkpoint N) and "
                     "update.next_checkpoint (checkpoint N+1)")
    if not checkpoint:
        return
    if model.get("adapter_path"):
        raise ConfigError("model.adapter_path: with model.checkpoint the adapter (if any) is the checkpoint's own; leave "
                     "adapter_path empty")
    layout = _layout(checkpoint, "model.checkpoint", require_optimizer=optimizer == "adamw")
    if layout.kind == "model" and model["name_or_path"] != EMBEDDED:
        raise ConfigError(f"model.name_or_path: model.checkpoint {checkpoint!r} is a full model, the policy itself; leave "
                     "name_or_path unset (it names the base model of an adapter checkpoint only)")
    if layout.kind == "adapter":
        base = model["name_or_path"] if model["name_or_path"] != EMBEDDED else layout.base_model
        if not base:
            raise ConfigError(f"model.checkpoint: {layout.path}/adapter_config.json names no base model; set "
                         "model.name_or_path")
        _check_base(base, "model.name_or_path" if model["name_or_path"] != EMBEDDED else
                    "model.checkpoint (adapter_config.json's base_model_name_or_path; set model.name_or_path to "
                    "override)")
    elif model.get("trainable") == "adapters":
        raise ConfigError(f"model.trainable: 'adapters' but model.checkpoint {checkpoint!r} is a full model, not an adapter")
    if layout.kind == "sharded":
        if model["name_or_path"] == EMBEDDED:
            raise ConfigError(f"model.name_or_path: model.checkpoint {checkpoint!r} is an FSDP sharded checkpoint, which "
                              "saves no config.json: set name_or_path to the model the run started from (its config "
                              "and tokenizer)")
        _check_base(model["name_or_path"], "model.name_or_path")
    if optimizer == "adamw":
        for key in ("optimizer_state", "optimizer_param_names"):
            if update.get(key):
                raise ConfigError(f"update.{key}: with model.checkpoint the AdamW state is the checkpoint's optimizer.pt, "
                             "its parameter order rebuilt from the Trainer's grouping; leave it empty")
        if layout.optimizer_format == "torch":  # folders (DCP, ZeRO) are read before any job (state_checks)
            check_torch_save_file(layout.optimizer, "model.checkpoint")
    if optimizer == CHECKPOINT_DIFF:
        if not following:
            raise ConfigError(f"update.next_checkpoint: update.optimizer {CHECKPOINT_DIFF} needs the checkpoint after "
                         "model.checkpoint")
        after = _layout(following, "update.next_checkpoint")
        if after.global_step <= layout.global_step:
            raise ConfigError(f"update.next_checkpoint: {following!r} is global step {after.global_step}, not after "
                         f"model.checkpoint's step {layout.global_step}")
        try:
            different = same_tensors(layout, after)
        except CheckpointFilesError as err:
            raise ConfigError(f"update.next_checkpoint: {err}") from err
        if different:
            raise ConfigError(f"update.next_checkpoint: does not fit model.checkpoint: {different}")
        if layout.optimizer is not None and layout.optimizer_format == "torch":
            check_torch_save_file(layout.optimizer, "model.checkpoint")


def trajectory(config: dict) -> list[CheckpointLayout]:
    """The checkpoints of ``model.checkpoints``, in training order (a ConfigError if they are none)."""
    try:
        return run_checkpoints(config["model"]["checkpoints"])
    except CheckpointFilesError as err:
        raise ConfigError(f"model.checkpoints: {err}") from err


def pair_config(config: dict, before: CheckpointLayout, after: CheckpointLayout) -> dict:
    """The config of one step of a trajectory: ``model.checkpoint`` = ``before``,
    ``update.next_checkpoint`` = ``after``, no ``model.checkpoints``."""
    pair = copy.deepcopy(config)
    pair["model"]["checkpoint"], pair["model"]["checkpoints"] = str(before.path), ""
    pair["update"]["next_checkpoint"] = str(after.path)
    return pair


def trajectory_pairs(config: dict) -> dict[str, dict]:
    """pair id -> that step's config, in training order ({} without ``model.checkpoints``)."""
    if not is_trajectory(config):
        return {}
    layouts = trajectory(config)
    return {pair_id(a, b): pair_config(config, a, b) for a, b in zip(layouts, layouts[1:])}


def _check_model(model: dict) -> None:
    """``name_or_path``, ``adapter_path`` and ``trainable``."""
    if model["name_or_path"] != EMBEDDED:
        check_checkpoint_path(model["name_or_path"], "model.name_or_path")
    if model.get("adapter_path"):
        if model["name_or_path"] == EMBEDDED:
            raise ConfigError("model.adapter_path: an adapter needs a checkpoint in model.name_or_path (the embedded "
                              "policy is built by the run; to put an adapter on it, give its directory)")
        check_checkpoint_path(model["adapter_path"], "model.adapter_path", adapter=True)
    trained = model.get("checkpoint") or model.get("checkpoints")  # an adapter checkpoint brings its adapter
    if model.get("trainable", "auto") == "adapters" and not model.get("adapter_path") and not trained:
        raise ConfigError("model.trainable: 'adapters' needs model.adapter_path")


def _check_checkpoints(config: dict) -> None:
    model, update = config["model"], config["update"]
    if not is_trajectory(config):
        _check_single(config)
        return
    for key, value in (("model.checkpoint", model.get("checkpoint")), ("model.adapter_path", model.get("adapter_path")),
                       ("update.next_checkpoint", update.get("next_checkpoint"))):
        if value:
            raise ConfigError(f"{key}: model.checkpoints (a trajectory) sets it for each pair of checkpoints; leave "
                              "it empty")
    if update["optimizer"] != CHECKPOINT_DIFF:
        raise ConfigError(f"update.optimizer: a trajectory (model.checkpoints) probes each step the trainer took: set "
                          f"update.optimizer: {CHECKPOINT_DIFF} (the probe's own AdamW step is compared with it "
                          "wherever a checkpoint has its optimizer.pt)")
    for pair in trajectory_pairs(config).values():
        _check_single(pair)


def check_config(config: dict) -> None:
    """The trainer-checkpoint keys, then the model section; a ConfigError naming the key at the
    first problem."""
    _check_checkpoints(config)
    _check_model(config["model"])


def policy_layout(config: dict) -> CheckpointLayout | None:
    return read_layout(config["model"]["checkpoint"]) if config["model"].get("checkpoint") else None


def compares_steps(config: dict) -> bool:
    """Whether a (single) checkpoint_diff probe also compares the probe's own AdamW step, from the
    checkpoint's optimizer state and the U batch, with the trainer's step: when there is a state."""
    layout = policy_layout(config)
    return config["update"]["optimizer"] == CHECKPOINT_DIFF and layout is not None and layout.optimizer is not None


def state_checks(config: dict) -> list[str]:
    """The arguments of ``python -m entropy_probe.trainer_checkpoint`` that check, before any job,
    every checkpoint optimizer state this config uses ([] when it uses none)."""
    configs = list(trajectory_pairs(config).values()) or [config]
    used = [c["model"]["checkpoint"] for c in configs if c["model"].get("checkpoint") and (
        c["update"]["optimizer"] == "adamw" or compares_steps(c))]
    if not used:
        return []
    model = config["model"]
    args = ["--trainable", model.get("trainable", "auto")]
    if model["name_or_path"] != EMBEDDED:
        args += ["--base", model["name_or_path"]]
    if model.get("trust_remote_code"):
        args.append("--trust-remote-code")
    return args + used
