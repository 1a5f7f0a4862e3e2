"""Where a run's input files are, found and checked without loading anything: the shared
constants and path predicates (``embedded``, what a hub id looks like), the files that define a
checkpoint or an adapter (fingerprinted, and declared as workflow inputs), the files the embedded
policy writes beside its weights, the optimizer-state paths of the ``update`` section, and the
checks that these files exist and look like what they should be.

Torch-free on purpose: the Snakefile calls these while it parses (on a cluster every job parses
it again; a torch import there costs seconds per job).
"""
from __future__ import annotations

import re
import zipfile
from pathlib import Path

from .errors import ConfigError

EMBEDDED = "embedded"  # model.name_or_path / data.source: the tiny policy and prompts the workflow builds
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")

FINGERPRINT_PATTERNS = ("*.safetensors", "*.bin", "*.py", "config.json", "tokenizer.json", "tokenizer_config.json",
                        "tokenizer.model", "chat_template.jinja")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")

# written by the embedded policy (entropy_probe.toy) beside its weights
PROMPTS_FILE = "prompts.jsonl"
STATE_FILE = "optimizer.pt"
NAMES_FILE = "optimizer_param_names.json"
EMBEDDED_STATE = "embedded"  # update.optimizer_state: the state the embedded policy saved


def looks_like_hub_id(name: str) -> bool:
    """``name`` or ``org/name`` without path syntax (no leading ``/``, ``.``, ``~``, no ``..``,
    at most one ``/``): what a hub id looks like. Anything else is meant as a local path."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The files of a checkpoint that define it: weights, config, tokenizer, remote code."""
    model_dir = Path(model_dir)
    return sorted({p for pattern in FINGERPRINT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})


def adapter_files(adapter_dir: str | Path) -> list[Path]:
    adapter_dir = Path(adapter_dir)
    return sorted(p for name in ADAPTER_FILES if (p := adapter_dir / name).is_file())


def check_checkpoint_path(value: str, key: str, adapter: bool = False) -> None:
    """A local directory that looks like a checkpoint (an adapter with ``adapter``), or a hub id
    (checked when it is fetched). A local-looking path that does not exist fails now."""
    path = Path(value).expanduser()
    if path.is_dir():
        if adapter and not (path / "adapter_config.json").is_file():
            raise ConfigError(f"{key}: {value!r} has no adapter_config.json (not a PEFT adapter directory)")
        if adapter and not any(p.name.startswith("adapter_model") for p in adapter_files(path)):
            raise ConfigError(f"{key}: {value!r} has no adapter_model.safetensors / adapter_model.bin")
        if not adapter and not checkpoint_files(path):
            raise ConfigError(f"{key}: {value!r} holds no weights, config or tokenizer files (not a checkpoint)")
        return
    if path.exists():
        raise ConfigError(f"{key}: {value!r} is a file; give a checkpoint directory or a hub id")
    if not looks_like_hub_id(value):
        raise ConfigError(f"{key}: {value!r} is not an existing directory (hub ids look like 'org/name')")


def check_torch_save_file(path: str | Path, key: str) -> None:
    """``path`` is readable and looks like a ``torch.save`` file (a zip archive, or a pickle in the
    legacy format), so that a typo or a truncated copy fails before any job; loading it checks the
    contents."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(1)
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {str(path)!r} ({err.strerror or err})") from err
    if not (head == b"\x80" or zipfile.is_zipfile(path)):
        raise ConfigError(f"{key}: {str(path)!r} is not a torch.save file (neither a zip archive nor a pickle): "
                          "corrupt or truncated?")


def resolve_state_paths(update_cfg: dict, policy_dir: str, embedded_model: bool) -> tuple[str, str] | None:
    """(state file, names file) configured in the ``update`` section, or None (no state: with
    ``adamw`` a fresh optimizer). ``embedded`` = the state the embedded policy saved in
    ``policy_dir``. A :class:`ConfigError` for a combination that makes no sense."""
    state, names = update_cfg.get("optimizer_state", ""), update_cfg.get("optimizer_param_names", "")
    if update_cfg["optimizer"] != "adamw":
        if state or names:
            raise ConfigError(
                f"update.optimizer_state / update.optimizer_param_names are set but update.optimizer is "
                f"{update_cfg['optimizer']!r}; they only apply to adamw (clear them or switch the optimizer)"
            )
        return None
    if not state:
        if names:
            raise ConfigError("update.optimizer_param_names is set but update.optimizer_state is empty")
        return None
    if state == EMBEDDED_STATE:
        if not embedded_model:
            raise ConfigError("update.optimizer_state: 'embedded' only goes with model.name_or_path: embedded; "
                              "give the path of the checkpoint's optimizer state file")
        state = str(Path(policy_dir) / STATE_FILE)
    return state, names or str(Path(state).parent / NAMES_FILE)


def check_state_files(update_cfg: dict, embedded_model: bool) -> None:
    """The optimizer state of ``update_cfg`` and its names file exist, and the state looks like a
    torch.save file (the embedded policy's state is written by the run)."""
    paths = resolve_state_paths(update_cfg, "", embedded_model)
    if paths is None or update_cfg["optimizer_state"] == EMBEDDED_STATE:
        return
    state, names = (Path(p).expanduser() for p in paths)
    for key, path in (("update.optimizer_state", state), ("update.optimizer_param_names", names)):
        default = (" (the default: optimizer_param_names.json beside the state)"
                   if path is names and not update_cfg.get("optimizer_param_names") else "")
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"{key}: {str(path)!r} {what}{default}")
    check_torch_save_file(state, "update.optimizer_state")
