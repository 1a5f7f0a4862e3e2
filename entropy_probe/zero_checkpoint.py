"""The optimizer state of a DeepSpeed ZeRO-1/2 checkpoint (``global_stepN/`` in an HF Trainer's
``checkpoint-N``), joined from the ranks' partitions into one AdamW state by parameter name.

ZeRO-1/2 flattens each param group's fp32 master weights into one vector and gives each rank a
contiguous slice of it; ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` holds rank r's slice of
the master weights (``single_partition_of_fp32_groups``) and of the torch optimizer's flat
``exp_avg``/``exp_avg_sq`` (``base_optimizer_state``), with ``param_slice_mappings``: for each
group, the parameters whose elements fall in this rank's slice, each with the start and length
of its piece. A parameter's pieces, in rank order, are its flattened elements;
``mp_rank_00_model_states.pt`` gives each group's parameters in order with their shapes.

Nothing is unpickled beyond an allow-list: every file is ``torch.load(weights_only=True)``; the
three DeepSpeed classes a partition file names (its loss scaler, its ZeRO stage, the piece
addresses) are read as plain stand-ins under their DeepSpeed names, so DeepSpeed need not be
installed. ZeRO-3 (partitioned weights, ``zero_pp_rank_*_model_states.pt``) is refused in one line.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import ProbeError

MODEL_STATES = "mp_rank_00_model_states.pt"
_PARTITION = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")


class ZeroCheckpointError(ValueError, ProbeError):
    """A DeepSpeed checkpoint that cannot be read, or whose partitions do not join up."""


class _Record:
    """A DeepSpeed object read as its fields only (``__dict__`` restored, nothing called)."""

    def __init__(self, *args):
        self.args = args


class _Stage(int):
    """DeepSpeed's ``ZeroStageEnum`` (an int enum), read as its int."""


_STAND_INS = [(_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
              (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
              (_Stage, "deepspeed.runtime.zero.config.ZeroStageEnum")]


def _load(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            value = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not readable"
        raise ZeroCheckpointError(f"{path}: cannot load ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if not isinstance(value, dict):
        raise ZeroCheckpointError(f"{path}: not a DeepSpeed checkpoint file (a {type(value).__name__})")
    return value


def partition_files(step_dir: str | Path) -> list[Path]:
    """The ranks' optimizer partition files of ``global_stepN/``, in rank order (0, 1, … with
    none missing: a gap is a :class:`ZeroCheckpointError` naming the missing rank)."""
    step_dir = Path(step_dir)
    ranked = {int(m.group(1)): p for p in step_dir.iterdir() if (m := _PARTITION.fullmatch(p.name))}
    if not ranked:
        raise ZeroCheckpointError(f"{step_dir}: no zero_pp_rank_*_mp_rank_00_optim_states.pt (not a ZeRO-1/2 "
                                  "checkpoint)")
    missing = sorted(set(range(max(ranked) + 1)) - set(ranked))
    if missing:
        raise ZeroCheckpointError(f"{step_dir}: the partition of rank {missing[0]} is missing "
                                  f"(zero_pp_rank_{missing[0]}_mp_rank_00_optim_states.pt)")
    return [ranked[r] for r in sorted(ranked)]


def optimizer_state_dict(step_dir: str | Path) -> dict:
    """The AdamW state of ``global_stepN/`` in ``torch.optim``'s layout with parameter names
    where it has integer ids: ``state`` maps a name to its ``step`` and whole ``exp_avg`` /
    ``exp_avg_sq`` (shaped like the parameter), each param group's ``params`` lists names."""
    step_dir = Path(step_dir)
    if list(step_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):
        raise ZeroCheckpointError(f"{step_dir}: a ZeRO-3 checkpoint (its weights are partitioned too): not covered; "
                                  "consolidate it with DeepSpeed's zero_to_fp32.py, or probe with "
                                  "update.optimizer: checkpoint_diff on the saved model")
    model_states = _load(step_dir / MODEL_STATES)
    shapes = model_states.get("param_shapes")
    if not isinstance(shapes, list):
        raise ZeroCheckpointError(f"{step_dir / MODEL_STATES}: no param_shapes (not a ZeRO-1/2 checkpoint)")
    files = partition_files(step_dir)
    world = model_states.get("dp_world_size")
    if world is not None and int(world) != len(files):
        raise ZeroCheckpointError(f"{step_dir}: {len(files)} partition files, but the run had {world} data-parallel "
                                  "ranks")
    pieces: dict[str, dict[str, list]] = {}
    groups, steps = None, {}
    for path in files:
        saved = _load(path).get("optimizer_state_dict") or {}
        base, mappings = saved.get("base_optimizer_state"), saved.get("param_slice_mappings")
        if not isinstance(base, dict) or not isinstance(mappings, list):
            raise ZeroCheckpointError(f"{path}: no base_optimizer_state / param_slice_mappings (a DeepSpeed version "
                                      "that writes no piece addresses is not covered)")
        groups = groups or base["param_groups"]
        for g, mapping in enumerate(mappings):
            flat = base["state"].get(g)
            if flat is None:
                raise ZeroCheckpointError(f"{path}: param group {g} has no optimizer state (never stepped)")
            steps[g] = float(flat["step"])
            for name, address in mapping.items():
                start, numel = int(address.start), int(address.numel)
                entry = pieces.setdefault(name, {"exp_avg": [], "exp_avg_sq": []})
                for key in entry:
                    entry[key].append(flat[key][start:start + numel])
    state, named_groups = {}, []
    for g, (group, group_shapes) in enumerate(zip(groups, shapes)):
        for name, shape in group_shapes.items():
            if name not in pieces:
                raise ZeroCheckpointError(f"{step_dir}: no rank holds a piece of {name!r}")
            joined = {key: torch.cat(parts) for key, parts in pieces[name].items()}
            if joined["exp_avg"].numel() != torch.Size(shape).numel():
                raise ZeroCheckpointError(f"{step_dir}: the pieces of {name!r} hold {joined['exp_avg'].numel()} "
                                          f"elements, its shape {tuple(shape)} has {torch.Size(shape).numel()}")
            state[name] = {"step": torch.tensor(steps[g])} | {k: v.reshape(shape) for k, v in joined.items()}
        named_groups.append({k: v for k, v in group.items() if k != "params"} | {"params": list(group_shapes)})
    return {"state": state, "param_groups": named_groups}
