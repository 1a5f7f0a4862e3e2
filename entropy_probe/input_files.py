"""Where a run's input files are, found without loading anything: the shared constants and path
predicates (``embedded``, what a hub id looks like), the files that define a checkpoint or an
adapter (fingerprinted, and declared as workflow inputs), the files the embedded policy writes
beside its weights, and the optimizer-state paths of the ``update`` section.

Torch-free and free of package imports on purpose: the Snakefile calls these while it parses (on
a cluster every job parses it again; a torch import there costs seconds per job), and both
:mod:`entropy_probe.config` and :mod:`entropy_probe.data` build on it.
"""
from __future__ import annotations

import re
from pathlib import Path

EMBEDDED = "embedded"  # model.name_or_path / data.source: the tiny policy and prompts the workflow builds
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def looks_like_hub_id(name: str) -> bool:
    """``name`` or ``org/name`` without path syntax (no leading ``/``, ``.``, ``~``, no ``..``,
    at most one ``/``): what a hub id looks like. Anything else is meant as a local path."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name

FINGERPRINT_PATTERNS = ("*.safetensors", "*.bin", "*.py", "config.json", "tokenizer.json", "tokenizer_config.json",
                        "tokenizer.model", "chat_template.jinja")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")

# written by the embedded policy (entropy_probe.toy) beside its weights
PROMPTS_FILE = "prompts.jsonl"
STATE_FILE = "optimizer.pt"
NAMES_FILE = "optimizer_param_names.json"
EMBEDDED_STATE = "embedded"  # update.optimizer_state: the state the embedded policy saved


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The files of a checkpoint that define it: weights, config, tokenizer, remote code."""
    model_dir = Path(model_dir)
    return sorted({p for pattern in FINGERPRINT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})


def adapter_files(adapter_dir: str | Path) -> list[Path]:
    adapter_dir = Path(adapter_dir)
    return sorted(p for name in ADAPTER_FILES if (p := adapter_dir / name).is_file())


def resolve_state_paths(update_cfg: dict, policy_dir: str, embedded_model: bool) -> tuple[str, str] | None:
    """(state file, names file) configured in the ``update`` section, or None (no state: with
    ``adamw`` a fresh optimizer). ``embedded`` = the state the embedded policy saved in
    ``policy_dir``. A ValueError (naming the key) for a combination that makes no sense."""
    state, names = update_cfg.get("optimizer_state", ""), update_cfg.get("optimizer_param_names", "")
    if update_cfg["optimizer"] != "adamw":
        if state or names:
            raise ValueError(
                f"update.optimizer_state / update.optimizer_param_names are set but update.optimizer is "
                f"{update_cfg['optimizer']!r}; they only apply to adamw (clear them or switch the optimizer)"
            )
        return None
    if not state:
        if names:
            raise ValueError("update.optimizer_param_names is set but update.optimizer_state is empty")
        return None
    if state == EMBEDDED_STATE:
        if not embedded_model:
            raise ValueError("update.optimizer_state: 'embedded' only goes with model.name_or_path: embedded; "
                             "give the path of the checkpoint's optimizer state file")
        state = str(Path(policy_dir) / STATE_FILE)
    return state, names or str(Path(state).parent / NAMES_FILE)
