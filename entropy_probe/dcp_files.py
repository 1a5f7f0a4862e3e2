"""A ``torch.distributed.checkpoint`` (DCP) folder — ``.metadata`` plus one ``__<rank>_0.distcp``
file per rank, as FSDP training with a sharded state dict writes it (accelerate / HF Trainer /
TRL: ``pytorch_model_fsdp_0/``, ``optimizer_0/``) — read in one process, by key, with no
process group, whole tensors joined from every rank's pieces by DCP itself.

Nothing is unpickled beyond an allow-list. DCP's own reader unpickles ``.metadata`` with plain
``pickle`` and its non-tensor items (an optimizer's param-group values) with
``torch.load(weights_only=False)``: both would run whatever code a crafted file names. Here
``.metadata`` goes through an unpickler that resolves only the classes a DCP index is made of
(:data:`METADATA_GLOBALS`, torch dtypes), and non-tensor items through
``torch.load(weights_only=True)``; anything else is a :class:`DCPError` naming the file and the
refused global, raised before it could run.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

from .errors import ProbeError

METADATA_FILE = ".metadata"

# The globals a DCP .metadata file is made of (torch 2.4-2.13): the index classes, sizes, dtypes.
METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.planner", "LoadItemType"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class DCPError(ValueError, ProbeError):
    """A DCP folder that cannot be read, holds something outside the allow-list, or lacks a key."""


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                    torch.dtype)):
            return super().find_class(module, name)
        raise DCPError(f"{self._path}: refers to {module}.{name}, which is not part of a DCP index; refused "
                       "without unpickling it (a DCP .metadata holds only the index classes, sizes and dtypes)")


def read_metadata(folder: str | Path):
    """The folder's DCP index (``torch.distributed.checkpoint.metadata.Metadata``), unpickled
    through the allow-list."""
    path = Path(folder) / METADATA_FILE
    try:
        with open(path, "rb") as f:
            metadata = _AllowListUnpickler(f, path).load()
    except DCPError:
        raise
    except Exception as err:  # a truncated or foreign file fails in many ways
        raise DCPError(f"{path}: not a readable DCP index ({type(err).__name__}: {err})") from err
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise DCPError(f"{path}: not a DCP index (it holds a {type(metadata).__name__})")
    return metadata


def keys(folder: str | Path) -> dict[str, tuple[int, ...] | None]:
    """Every key the folder saves: its shape for a tensor, None for another value."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {key: tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else None
            for key, entry in read_metadata(folder).state_dict_metadata.items()}


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class AllowListReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return AllowListReader(str(folder))


def _planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    return WeightsOnlyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def load(folder: str | Path, wanted: list[str], into: dict[str, torch.Tensor] | None = None) -> dict:
    """The values of the keys ``wanted``: whole tensors (every rank's chunks joined, on the CPU,
    in the saved dtype, or written in place into ``into``'s tensor of that key, cast to its dtype)
    and other values (``torch.load(weights_only=True)``). A key the folder lacks is a
    :class:`DCPError` naming it."""
    import warnings

    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = Path(folder)
    metadata = read_metadata(folder)
    _check_files(folder, metadata)
    index = metadata.state_dict_metadata
    missing = [k for k in wanted if k not in index]
    if missing:
        raise DCPError(f"{folder}: no key {missing[0]!r} ({len(missing)} of {len(wanted)} wanted keys missing)")
    into = into or {}
    state = {k: into[k] if k in into else torch.empty(tuple(index[k].size), dtype=index[k].properties.dtype)
             if isinstance(index[k], TensorStorageMetadata) else None for k in wanted}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp_load(state, storage_reader=_reader(folder), planner=_planner(), no_dist=True)
    except DCPError:
        raise
    except (Exception, CheckpointException) as err:  # a missing or truncated rank file, a refused global
        raise DCPError(f"{folder}: cannot read the checkpoint ({_cause(err)})") from err
    return state


def _check_files(folder: Path, metadata) -> None:
    """Every rank file the index names is there and long enough (else a :class:`DCPError` naming
    it: DCP itself reports a missing file without its name)."""
    extents: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        extents[name] = max(extents.get(name, 0), int(info.offset) + int(info.length))
    for name, needed in sorted(extents.items()):
        path = folder / name
        if not path.is_file():
            raise DCPError(f"{path}: missing; the index names {len(extents)} rank files ({', '.join(sorted(extents))}): "
                           "copy every rank's file of the checkpoint")
        if path.stat().st_size < needed:
            raise DCPError(f"{path}: {path.stat().st_size} bytes, the index reads up to byte {needed}: truncated")


def _cause(err: BaseException) -> str:
    """One line for what went wrong inside DCP's reader (it wraps each rank's failure, with its
    traceback, in a ``CheckpointException``)."""
    text = str(err)
    refused = re.search(r"unsupported GLOBAL (\S+)", text)
    if refused:
        return f"a saved value refers to {refused.group(1)}, which loading with weights_only refuses; not unpickled"
    failures = getattr(err, "failures", None)
    if failures:
        failure = next(iter(failures.values()))
        failure = failure[0] if isinstance(failure, tuple) and failure else failure  # (exception, frames)
        text = f"{type(failure).__name__}: {failure}" if isinstance(failure, BaseException) else str(failure)
    else:
        text = f"{type(err).__name__}: {text}"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)


_OPTIMIZER_KEY = re.compile(r"(?P<prefix>(?:[A-Za-z_]+\.)?)(?:state\.(?P<name>.+)\.(?P<field>exp_avg|exp_avg_sq|step"
                            r"|max_exp_avg_sq)|param_groups\.(?P<group>\d+)\.(?P<option>\w+))")


def optimizer_state_dict(folder: str | Path) -> dict:
    """A torch optimizer ``state_dict`` saved through DCP by parameter name (torch's
    ``get_optimizer_state_dict`` layout, as accelerate saves ``optimizer_0/``: keys
    ``<prefix>state.<name>.<field>`` and ``<prefix>param_groups.<i>.<option>``), in
    ``torch.optim``'s own layout with parameter names where it has integer ids: ``state`` maps a
    name to its ``step``/``exp_avg``/``exp_avg_sq``, each param group's ``params`` lists names."""
    folder = Path(folder)
    saved = keys(folder)
    matches = {key: _OPTIMIZER_KEY.fullmatch(key) for key in saved}
    foreign = [key for key, m in matches.items() if m is None]
    prefixes = {m["prefix"] for m in matches.values() if m is not None}
    if foreign or len(prefixes) != 1:
        raise DCPError(f"{folder}: not an optimizer state saved by parameter name (key "
                       f"{(foreign or sorted(saved))[0]!r}; expected <prefix>state.<name>.exp_avg and "
                       "<prefix>param_groups.<i>.params)")
    values = load(folder, list(saved))
    state: dict[str, dict] = {}
    groups: dict[int, dict] = {}
    for key, m in matches.items():
        if m["name"] is not None:
            state.setdefault(m["name"], {})[m["field"]] = values[key]
        else:
            groups.setdefault(int(m["group"]), {})[m["option"]] = values[key]
    if sorted(groups) != list(range(len(groups))) or any("params" not in g for g in groups.values()):
        raise DCPError(f"{folder}: its param groups are incomplete (numbers {sorted(groups)}, each needs 'params')")
    return {"state": state, "param_groups": [groups[i] for i in range(len(groups))]}


def load_model_weights(model, folder: str | Path) -> None:
    """Every parameter and buffer of ``model`` (an ``nn.Module``) from an FSDP sharded
    checkpoint's model folder (keys ``model.<name>`` as accelerate saves them, or ``<name>``), cast
    to the model's dtype. A name the folder lacks, a shape that differs, or a saved tensor the
    model does not have is a :class:`DCPError` naming it: the architecture must be the run's."""
    saved = {k: v for k, v in keys(folder).items() if v is not None}
    prefix = "model." if all(k.startswith("model.") for k in saved) else ""
    own = dict(model.state_dict(keep_vars=True))
    names = {name: prefix + name for name in own}
    absent = [n for n, key in names.items() if key not in saved]
    tied = {n for n in absent if n == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)}
    if [n for n in absent if n not in tied]:
        first = next(n for n in absent if n not in tied)
        raise DCPError(f"{folder}: saves no {prefix + first!r}: not a checkpoint of model.name_or_path's "
                       "architecture")
    stray = sorted(set(saved) - set(names.values()))
    if stray:
        raise DCPError(f"{folder}: saves {stray[0]!r}, which model.name_or_path's architecture does not have")
    for name, tensor in own.items():
        if name not in tied and tuple(tensor.shape) != saved[names[name]]:
            raise DCPError(f"{folder}: {names[name]!r} has shape {saved[names[name]]}, the model's "
                           f"{tuple(tensor.shape)}")
    # straight into the model's tensors (state_dict() aliases them, detached): no second copy
    destinations = {names[n]: t for n, t in model.state_dict().items() if n not in tied}
    load(folder, list(destinations), into=destinations)
