"""What-if over update rules (``update.variants``): a named map of overrides of the update, each
giving its own v and δH₁(η) from the same E batch and the same X (computed once), and with
``snis: true`` its SNIS ΔH(η) (opt-in: a forward pass over the E batch per point of the sweep).

A variant overrides some of :data:`OVERRIDES` (the loss type and its settings, the advantage
scaling, the optimizer and its state, clipping) and may scale the step by ``lr_factor``: its v
is ``lr_factor`` times the v that a run with the overridden keys as its main update gives, so
that δH₁(η) = η·X·v and ΔH(η) at θ + η·v are "the variant's step at base learning rate η".

Each variant runs its stages on its *effective config*: the config with the overrides applied
and a ``variant`` section (its name and lr_factor), so the main stages' scripts and their
defining keys (:mod:`entropy_probe.stage_keys`) serve the variants unchanged. Variants whose
objective (loss type, its settings, scale_rewards) is the main update's reuse the main Y;
variants that share an objective share one Y (:func:`objective_id`).

Variants vary the update rule on the U batch, so they do not apply where v is not an update on
a U batch (``update.optimizer: checkpoint_diff``, v the trainer's step): there they are skipped
with a note (:func:`skipped_note`), never an error.

Torch-free: the Snakefile imports this while it parses.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re

from . import losses
from .errors import ConfigError
from .input_files import check_state_files
from .model_config import CHECKPOINT_DIFF, is_embedded
from .stage_keys import ROLLOUT_PROVENANCE, STAGE_KEYS, defining_values

# variant key -> the config key it overrides
OVERRIDES = {
    "loss_type": "update.loss_type",
    "max_completion_length": "update.max_completion_length",
    "loss_scale_factor": "update.loss_scale_factor",
    "micro_batch_size": "update.micro_batch_size",
    "scale_rewards": "update.scale_rewards",
    "optimizer": "update.optimizer",
    "optimizer_state": "update.optimizer_state",
    "optimizer_param_names": "update.optimizer_param_names",
    "max_grad_norm": "update.max_grad_norm",
}
LR_FACTOR = "lr_factor"
SNIS = "snis"  # opt-in: the variant's SNIS sweep (ΔH(η) at every η, a forward pass over E per point)
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RESERVED = ("main",)


def configured(config: dict) -> list[str]:
    """The variants ``update.variants`` names, sorted by name."""
    return sorted((config.get("update") or {}).get("variants") or {})


def names(config: dict) -> list[str]:
    """The variants the run computes, sorted by name (the order of every list of them: rule
    inputs, tables; independent of how a config file or a canonical JSON orders its keys): none
    where they do not apply (:func:`skipped_note`)."""
    return [] if skipped_note(config) else configured(config)


def with_snis(config: dict) -> list[str]:
    """The variants whose ΔH(η) is measured (``snis: true``), sorted by name."""
    return [name for name in names(config) if (config["update"]["variants"][name] or {}).get(SNIS, False)]


def skipped_note(config: dict) -> str | None:
    """Why the configured variants are not computed, or None."""
    if configured(config) and config["update"]["optimizer"] == CHECKPOINT_DIFF:
        return (f"update.variants ({', '.join(configured(config))}) skipped: a variant is another update rule on "
                f"the U batch, and with update.optimizer {CHECKPOINT_DIFF} v is the trainer's step (no U batch)")
    return None


def variant_config(config: dict, name: str) -> dict:
    """The effective config of variant ``name``: a copy of ``config`` with its overrides applied
    and a section ``variant`` = {name, lr_factor}. Overriding ``optimizer`` clears the main's
    optimizer_state / optimizer_param_names unless the variant sets them too (a state belongs to
    one optimizer)."""
    overrides = config["update"]["variants"][name] or {}
    out = copy.deepcopy(config)
    if "optimizer" in overrides:
        out["update"]["optimizer_state"] = ""
        out["update"]["optimizer_param_names"] = ""
    for key, value in overrides.items():
        if key in (LR_FACTOR, SNIS):
            continue
        section, field = OVERRIDES[key].split(".")
        out[section][field] = value
    out["variant"] = {"name": name, "lr_factor": float(overrides.get(LR_FACTOR, 1.0))}
    return out


def objective_id(config: dict) -> str:
    """A name for the U objective of a (main or effective) config: its loss type and a hash of
    the values that define the u_objective stage beyond the rollouts (loss type and settings,
    scale_rewards), so equal objectives share their Y and the name survives a change of the
    rollouts (which reruns it in place)."""
    values = {k: v for k, v in defining_values(config, "u_objective").items() if k not in ROLLOUT_PROVENANCE}
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
    assert set(values) | set(ROLLOUT_PROVENANCE) == set(STAGE_KEYS["u_objective"])
    return f"{config['update']['loss_type']}-{digest}"


def check_config(config: dict) -> None:
    """Names usable as file names and wildcards; each variant's effective config passes the main
    update's checks (loss settings, optimizer state files); a :class:`ConfigError` names
    ``update.variants.<name>`` first."""
    for name in names(config):
        where = f"update.variants.{name}"
        if not NAME_PATTERN.match(name) or name in RESERVED:
            raise ConfigError(f"{where}: a variant name is a letter followed by letters, digits or _ "
                              f"(and not {', '.join(RESERVED)})")
        overrides = config["update"]["variants"][name] or {}
        unknown = sorted(set(overrides) - set(OVERRIDES) - {LR_FACTOR, SNIS})
        if unknown:
            raise ConfigError(f"{where}: unknown override {unknown[0]!r} ({', '.join([*OVERRIDES, LR_FACTOR, SNIS])})")
        if not isinstance(overrides.get(SNIS, False), bool):
            raise ConfigError(f"{where}.{SNIS}: true or false (measure the variant's ΔH(η) by SNIS), "
                              f"got {overrides[SNIS]!r}")
        effective = variant_config(config, name)
        try:
            losses.check_config(effective)
            check_state_files(effective["update"], is_embedded(effective["model"]))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err


def describe(config: dict, name: str) -> str:
    """The overrides of a variant as one line (`loss_type=dapo, lr_factor=0.5`)."""
    overrides = config["update"]["variants"][name] or {}
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(no override)"
