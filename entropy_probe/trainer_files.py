"""What an HF ``Trainer`` / TRL checkpoint directory ``checkpoint-N`` holds, read without torch:
its kind (a full model; a PEFT adapter on ``base_model_name_or_path``; or, from a multi-process
FSDP run with a sharded state dict, the DCP folders ``pytorch_model_fsdp_0/`` and
``optimizer_0/``, whose architecture is ``model.name_or_path``'s), its optimizer (``optimizer.pt``,
``optimizer_0/``, or a DeepSpeed ZeRO run's per-rank partitions in ``global_stepN/``),
scheduler and trainer-state files, its global step, the names and shapes of its saved tensors
(from the safetensors headers, which are JSON), and the checkpoints of a run in training order.

Torch-free on purpose: the Snakefile calls these while it parses (the config checks of
``model.checkpoint``, ``update.next_checkpoint`` and ``model.checkpoints``, and the trajectory's
pairs). Loading anything (weights, optimizer state, the learning rate in ``scheduler.pt``) is
:mod:`entropy_probe.trainer_checkpoint`'s job.
"""
from __future__ import annotations

import glob
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ProbeError
from .input_files import adapter_files, checkpoint_files

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# FSDP with SHARDED_STATE_DICT (accelerate's save_fsdp_model / save_fsdp_optimizer): DCP folders,
# no config.json and no weights file of their own
FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
FSDP_OPTIMIZER_DIR = "optimizer_0"
DCP_METADATA = ".metadata"
_STEP_NAME = re.compile(r"checkpoint-(\d+)")
_DEEPSPEED_STEP = re.compile(r"global_step\d+")


class CheckpointFilesError(ValueError, ProbeError):
    """A checkpoint directory that is not what a Trainer saves, or a list of them that is no run."""


@dataclass(frozen=True)
class CheckpointLayout:
    """The files of a ``checkpoint-N`` directory (nothing loaded)."""

    path: Path
    kind: str  # "model" (config.json + weights), "adapter" (PEFT) or "sharded" (FSDP DCP folders)
    base_model: str | None  # adapter: adapter_config.json's base_model_name_or_path
    optimizer: Path | None  # optimizer.pt, optimizer_0/ or global_stepN/; None when the run saved the model only
    scheduler: Path | None
    trainer_state: Path | None
    global_step: int

    def input_files(self) -> list[str]:
        """The files that define this checkpoint for the probe (declared as workflow inputs):
        weights, config and tokenizer (or the adapter's files), the scheduler and trainer state
        (the learning rate). The optimizer state is an input of the stages that use it."""
        if self.kind == "sharded":
            files = [p for p in (self.path / FSDP_MODEL_DIR).iterdir() if p.is_file()]
        else:
            files = adapter_files(self.path) if self.kind == "adapter" else checkpoint_files(self.path)
        extra = [p for p in (self.scheduler, self.trainer_state) if p is not None]
        return sorted({str(p) for p in [*files, *extra]})


    @property
    def optimizer_format(self) -> str:
        """How the optimizer state is saved: "torch" (optimizer.pt), "dcp" (FSDP's optimizer_0/)
        or "zero" (DeepSpeed ZeRO-1/2 per-rank partitions in global_stepN/)."""
        if self.kind == "sharded":
            return "dcp"
        return "zero" if self.optimizer is not None and self.optimizer.is_dir() else "torch"

    def optimizer_files(self) -> list[str]:
        """The optimizer state's files: optimizer.pt, or every file of its folder (optimizer_0/,
        global_stepN/)."""
        if self.optimizer is None:
            return []
        if self.optimizer.is_dir():
            return sorted(str(p) for p in self.optimizer.iterdir() if p.is_file())
        return [str(self.optimizer)]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointFilesError(f"{path}: cannot read ({err})") from err
    if not isinstance(value, dict):
        raise CheckpointFilesError(f"{path}: expected a JSON object")
    return value


def _deepspeed_step(directory: Path, found: list[str]) -> str:
    """The ``global_stepN`` folder of a DeepSpeed checkpoint: the one its ``latest`` file names."""
    latest = directory / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        if name not in found:
            raise CheckpointFilesError(f"{latest}: names {name!r}, which is not a folder here ({found})")
        return name
    if len(found) > 1:
        raise CheckpointFilesError(f"{directory}: several DeepSpeed step folders {found} and no 'latest' naming one")
    return found[0]


def read_layout(checkpoint_dir: str | Path, require_optimizer: bool = False) -> CheckpointLayout:
    """The layout of a checkpoint directory; :class:`CheckpointFilesError` naming the directory
    (or file) when it is not one. The global step is ``trainer_state.json``'s ``global_step``,
    or the N of the directory name ``checkpoint-N``; both present and different is an error."""
    directory = Path(checkpoint_dir).expanduser()
    if not directory.is_dir():
        raise CheckpointFilesError(f"{directory}: not a directory")
    deepspeed = sorted(p.name for p in directory.glob("global_step*") if _DEEPSPEED_STEP.fullmatch(p.name))
    if (directory / ADAPTER_CONFIG).is_file():
        kind, base = "adapter", _read_json(directory / ADAPTER_CONFIG).get("base_model_name_or_path")
        if not (directory / ADAPTER_WEIGHTS).is_file() and not (directory / "adapter_model.bin").is_file():
            raise CheckpointFilesError(f"{directory}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    elif (directory / "config.json").is_file() and any((directory / f).is_file() for f in MODEL_WEIGHTS):
        kind, base = "model", None
    elif (directory / FSDP_MODEL_DIR / DCP_METADATA).is_file():
        kind, base = "sharded", None
    elif deepspeed:
        raise CheckpointFilesError(f"{directory}: a DeepSpeed ZeRO checkpoint with no model weights ({deepspeed[0]}/ "
                                   "holds partitioned weights, as ZeRO-3 saves them): not covered; consolidate it "
                                   "with DeepSpeed's zero_to_fp32.py into a model directory")
    else:
        raise CheckpointFilesError(f"{directory}: neither a PEFT adapter ({ADAPTER_CONFIG}), a model "
                                   f"(config.json and weights) nor an FSDP sharded checkpoint ({FSDP_MODEL_DIR}/)")
    optimizer = directory / (FSDP_OPTIMIZER_DIR if kind == "sharded" else OPTIMIZER_FILE)
    has_optimizer = (optimizer / DCP_METADATA).is_file() if kind == "sharded" else optimizer.is_file()
    if kind == "model" and not has_optimizer and deepspeed:
        optimizer, has_optimizer = directory / _deepspeed_step(directory, deepspeed), True
    if require_optimizer and not has_optimizer:
        raise CheckpointFilesError(f"{directory}: no {optimizer.name} (was the checkpoint saved with "
                                   "save_only_model?)")
    state_path = directory / TRAINER_STATE_FILE
    state = _read_json(state_path) if state_path.is_file() else None
    named = _STEP_NAME.fullmatch(directory.name)
    step = state.get("global_step") if state else None
    if step is None and named is None:
        raise CheckpointFilesError(f"{directory}: no {TRAINER_STATE_FILE} and not named checkpoint-N: the global "
                                   "step is unknown")
    if step is not None and named is not None and int(named.group(1)) != int(step):
        raise CheckpointFilesError(f"{state_path}: global_step {step} differs from the directory name")
    scheduler = directory / SCHEDULER_FILE
    return CheckpointLayout(directory, kind, base, optimizer if has_optimizer else None,
                            scheduler if scheduler.is_file() else None, state_path if state else None,
                            int(step if step is not None else named.group(1)))


def logged_learning_rates(layout: CheckpointLayout) -> dict[int, float]:
    """step -> the learning rate ``trainer_state.json``'s log history records for it (the rate
    that step used)."""
    if layout.trainer_state is None:
        return {}
    history = _read_json(layout.trainer_state).get("log_history") or []
    return {int(e["step"]): float(e["learning_rate"]) for e in history
            if isinstance(e, dict) and "step" in e and "learning_rate" in e}


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a ``.safetensors`` file's JSON header (no tensor read), or from
    every shard of a ``*.safetensors.index.json``."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
        return {k: v for shard in shards for k, v in safetensors_shapes(path.parent / shard).items()}
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as err:
        raise CheckpointFilesError(f"{path}: not a readable safetensors file ({err})") from err
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def saved_shapes(layout: CheckpointLayout) -> dict[str, tuple[int, ...]] | None:
    """The checkpoint's saved tensors (model weights, or the adapter's), name -> shape; None when
    they are not in safetensors (a pickle ``.bin`` is only read by loading it; a DCP index is a
    pickle too, read by :mod:`entropy_probe.dcp_files`)."""
    if layout.kind == "sharded":
        return None
    if layout.kind == "adapter":
        weights = layout.path / ADAPTER_WEIGHTS
        return safetensors_shapes(weights) if weights.is_file() else None
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (layout.path / name).is_file():
            return safetensors_shapes(layout.path / name)
    return None


def same_tensors(before: CheckpointLayout, after: CheckpointLayout) -> str | None:
    """None when the two checkpoints save the same tensor names with the same shapes (or this
    cannot be read without loading), else a one-line description of the first difference."""
    if before.kind != after.kind:
        kinds = {"model": "a full model", "adapter": "a PEFT adapter", "sharded": "an FSDP sharded checkpoint"}
        return f"{after.path} is {kinds[after.kind]}, {before.path} {kinds[before.kind]}"
    a, b = saved_shapes(before), saved_shapes(after)
    if a is None or b is None:
        return None
    for name in sorted(set(a) | set(b)):
        if name not in b:
            return f"{after.path} has no tensor {name!r}"
        if name not in a:
            return f"{after.path} has a tensor {name!r} that {before.path} lacks"
        if a[name] != b[name]:
            return f"tensor {name!r} has shape {b[name]} in {after.path}, {a[name]} in {before.path}"
    return None


def run_checkpoints(spec: str | list[str]) -> list[CheckpointLayout]:
    """The checkpoints of ``model.checkpoints`` (a glob, or a list of directories and globs) in
    training order (by global step). Fewer than two, or a repeated step or directory name, is a
    :class:`CheckpointFilesError` (whether consecutive ones fit together: :func:`same_tensors`)."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        if glob.has_magic(expanded):
            found = sorted(Path(p) for p in glob.glob(expanded) if Path(p).is_dir())
            if not found:
                raise CheckpointFilesError(f"{pattern!r} matches no directory")
            paths += found
        else:
            paths.append(Path(expanded))
    layouts = sorted((read_layout(p) for p in dict.fromkeys(p.resolve() for p in paths)),
                     key=lambda c: c.global_step)
    if len(layouts) < 2:
        raise CheckpointFilesError(f"{len(layouts)} checkpoint(s) found; a trajectory needs two or more")
    for first, second in zip(layouts, layouts[1:]):
        if first.global_step == second.global_step:
            raise CheckpointFilesError(f"{first.path} and {second.path} are both global step {first.global_step}")
    names = [c.path.name for c in layouts]
    if len(set(names)) != len(names):
        raise CheckpointFilesError(f"two checkpoints have the same directory name ({names}): give one run's")
    return layouts


def pair_id(before: CheckpointLayout, after: CheckpointLayout) -> str:
    """The results/pairs/<id> folder name of one step: ``<name of t>_to_<name of t+1>``."""
    return f"{before.path.name}_to_{after.path.name}"
