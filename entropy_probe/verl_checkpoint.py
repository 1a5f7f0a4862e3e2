"""A verl actor checkpoint — ``global_step_N/actor/`` as verl's ``FSDPCheckpointManager`` writes it:
``model_world_size_W_rank_r.pt``, ``optim_world_size_W_rank_r.pt`` and
``extra_state_world_size_W_rank_r.pt`` for every rank r, ``fsdp_config.json``
(``{"FSDP_version": 1|2, "world_size": W}``) and ``huggingface/`` (config and tokenizer, no
weights) — read in one process, by parameter name.

Each rank's model file maps HF parameter names to DTensors holding that rank's shard; a tensor
is joined from the ranks' ``_local_tensor`` along its placement's dim (never assumed to be 0:
older verl sharded some parameters on another dim), a replicated one read once; with one rank
the values are plain tensors. The optimizer file is the rank's plain ``optimizer.state_dict()``
(one param group over every parameter, frozen ones included, in ``named_parameters()`` order;
exp_avg / exp_avg_sq as DTensors aligned with the parameter's shards). FSDP1 with its default
``use_orig_params: false`` saves flat per-unit slices with no layout instead: refused in one line
naming the verl setting that makes a readable run.

Nothing is unpickled beyond an allow-list: ``torch.load(weights_only=True)`` with the DTensor
classes, which ``torch.distributed.tensor`` registers as safe on import; the extra-state file
(RNG states, numpy pickles) is never read — the learning rate is in the optimizer's param group.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .errors import ProbeError

CONFIG_FILE = "fsdp_config.json"
_RANK_FILE = re.compile(r"(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt")


class VerlCheckpointError(ValueError, ProbeError):
    """A verl checkpoint folder that cannot be read, or whose rank files do not join up."""


def actor_dir(path: str | Path) -> Path:
    """``global_step_N/actor`` from either that folder or ``global_step_N``."""
    path = Path(path).expanduser()
    actor = path if path.name == "actor" else path / "actor"
    if not actor.is_dir():
        raise VerlCheckpointError(f"{path}: no actor/ folder (a verl global_step_N holds its policy in actor/)")
    return actor


def world_size(actor: Path) -> tuple[int | None, int]:
    """(FSDP version or None when unknown, the number of ranks) from ``fsdp_config.json``, or from
    the rank files' names where an older verl wrote no such file; the two must agree."""
    named = {int(m.group(2)) for p in actor.iterdir() if (m := _RANK_FILE.fullmatch(p.name))}
    if len(named) > 1:
        raise VerlCheckpointError(f"{actor}: rank files of several world sizes {sorted(named)}; keep one run's")
    config = actor / CONFIG_FILE
    if not config.is_file():
        if not named:
            raise VerlCheckpointError(f"{actor}: no {CONFIG_FILE} and no model_world_size_*_rank_*.pt files")
        return None, named.pop()
    try:
        saved = json.loads(config.read_text())
        version, size = saved.get("FSDP_version"), int(saved["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VerlCheckpointError(f"{config}: not a verl FSDP config ({err})") from err
    if named and named != {size}:
        raise VerlCheckpointError(f"{config}: world_size {size}, but the rank files are of world size {named.pop()}")
    return version, size


def rank_files(actor: Path, kind: str) -> list[Path]:
    """``<kind>_world_size_W_rank_r.pt`` for every rank r, in rank order (a missing one is an error)."""
    _, size = world_size(actor)
    files = [actor / f"{kind}_world_size_{size}_rank_{r}.pt" for r in range(size)]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise VerlCheckpointError(f"{actor}: {missing[0]} is missing ({len(missing)} of {size} {kind} files): copy "
                                  "every rank's files of the checkpoint")
    return files


def _load(path: Path) -> dict:
    import torch.distributed.tensor  # noqa: F401  registers DTensor, its mesh and placements as weights_only-safe

    try:
        value = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not readable"
        raise VerlCheckpointError(f"{path}: cannot load ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    if not isinstance(value, dict):
        raise VerlCheckpointError(f"{path}: expected a dict, found a {type(value).__name__}")
    return value


def _join(values: list, what: str) -> torch.Tensor:
    """One whole tensor from the ranks' values of it (DTensor shards, or plain copies)."""
    from torch.distributed.tensor import DTensor

    first = values[0]
    if not isinstance(first, DTensor):
        return first
    if len(first.placements) != 1:
        raise VerlCheckpointError(f"{what}: placements {first.placements} of a {len(first.placements)}-D mesh (HSDP): "
                                  "not covered yet")
    (placement,) = first.placements
    if placement.is_replicate():
        return first._local_tensor
    if not placement.is_shard():
        raise VerlCheckpointError(f"{what}: placement {placement} is neither a shard nor a replica")
    whole = torch.cat([v._local_tensor for v in values], dim=placement.dim)
    if tuple(whole.shape) != tuple(first.shape):
        raise VerlCheckpointError(f"{what}: the ranks' shards join to {tuple(whole.shape)}, the tensor is "
                                  f"{tuple(first.shape)}")
    return whole


def model_state(actor: str | Path) -> dict[str, torch.Tensor]:
    """Parameter (and buffer) name -> the whole tensor, in the saved dtype."""
    actor = actor_dir(actor)
    files = rank_files(actor, "model")
    parts = [_load(p) for p in files]
    for path, part in zip(files[1:], parts[1:]):
        if set(part) != set(parts[0]):
            raise VerlCheckpointError(f"{path}: saves other names than {files[0].name}")
    return {name: _join([part[name] for part in parts], f"{files[0].parent}: {name}") for name in parts[0]}


def optimizer_state_dict(actor: str | Path, names: list[str]) -> dict:
    """The AdamW state in ``torch.optim``'s layout with parameter names where it has integer ids,
    ``names`` being the model's parameters in ``named_parameters()`` order (the order verl
    builds its one param group in). Only stepped parameters have state."""
    actor = actor_dir(actor)
    files = rank_files(actor, "optim")
    parts = [_load(p) for p in files]
    groups = parts[0].get("param_groups")
    if not isinstance(groups, list) or not isinstance(parts[0].get("state"), dict):
        raise VerlCheckpointError(f"{files[0]}: not a torch optimizer state_dict")
    ids = [i for g in groups for i in g["params"]]
    if len(ids) != len(names):
        raise VerlCheckpointError(f"{files[0]}: {len(ids)} parameters in the optimizer, the model has {len(names)} "
                                  "(another model, or FSDP1 flat parameters: verl writes a readable state with "
                                  "actor.strategy: fsdp2, or actor.fsdp_config.use_orig_params: true)")
    name_of = dict(zip(ids, names))
    state = {}
    for i in parts[0]["state"]:
        entries = [part["state"][i] for part in parts]
        state[name_of[i]] = {k: entries[0][k] if k == "step" else _join([e[k] for e in entries], f"{files[0]}: "
                             f"{name_of[i]} {k}") for k in entries[0]}
    return {"state": state, "param_groups": [{k: v for k, v in g.items() if k != "params"} | {
        "params": [name_of[i] for i in g["params"]]} for g in groups]}
