"""The one module that reads and writes a stage's files: shards (safetensors), JSON and text.

Every write goes to a temporary name in the same directory and is renamed into place, so a
killed job never leaves a truncated file under a final name. Metadata rides in the safetensors
header as one JSON string; readers check it against what they expect, and a set of shards read
together (:func:`read_set`) against each other.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ProbeError

SCHEMA_VERSION = 1
_META_KEY = "entropy_probe"


class ShardError(RuntimeError, ProbeError):
    """A shard that is missing, corrupt, or does not match what the reader expects."""


@contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path next to ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed writer of this same output (Snakemake never runs two at once).
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs are readable like any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, blob: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)


def read_json(path: str | Path):
    with open(path) as f:
        return json.load(f)


def write_shard(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Save ``tensors`` (contiguous CPU copies) with ``metadata`` and the schema version."""
    header = {_META_KEY: json.dumps({"schema_version": SCHEMA_VERSION, **metadata}, sort_keys=True)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_metadata(path: str | Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as err:
        raise ShardError(f"{path}: not a readable safetensors shard ({err})") from err
    if raw is None:
        raise ShardError(f"{path}: no entropy_probe metadata in the safetensors header")
    meta = json.loads(raw)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema version {meta.get('schema_version')} != expected {SCHEMA_VERSION}")
    return meta


def read_shard(path: str | Path, expect: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load all tensors and the metadata; every key in ``expect`` must equal the header's value."""
    meta = read_metadata(path)
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise ShardError(f"{path}: metadata {key!r} is {meta.get(key)!r}, expected {want!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ShardError(f"{path}: corrupt safetensors shard ({err})") from err
    return tensors, meta


@dataclass
class ShardSet:
    """Shards read together (:func:`read_set`): their tensors and headers, in the order given
    (shard-index order once :meth:`complete`), and the header values they agree on."""

    paths: list[str]
    tensors: list[dict[str, torch.Tensor]]
    metas: list[dict]
    common: dict

    def cat(self, name: str, dim: int = 0) -> torch.Tensor:
        """One field of every shard, concatenated along ``dim``."""
        return torch.cat([t[name] for t in self.tensors], dim=dim)

    def subset(self, indices: list[int]) -> "ShardSet":
        return ShardSet([self.paths[i] for i in indices], [self.tensors[i] for i in indices],
                        [self.metas[i] for i in indices], self.common)

    def complete(self) -> "ShardSet":
        """The set in shard-index order, checked to be one whole batch: the headers'
        ``shard_index`` runs over 0..n−1 once each and ``num_shards`` is n."""
        indices = [meta.get("shard_index") for meta in self.metas]
        counts = {meta.get("num_shards") for meta in self.metas}
        if counts != {len(self.paths)} or sorted(indices) != list(range(len(self.paths))):
            raise ShardError(f"not one complete set of shards (indices {indices} of {sorted(counts, key=str)}): "
                             f"{self.paths}")
        return self.subset(sorted(range(len(self.paths)), key=lambda i: indices[i]))

    def __len__(self) -> int:
        return len(self.paths)


def read_set(paths, expect: dict | None = None, agree: tuple[str, ...] = ()) -> ShardSet:
    """Every shard of ``paths`` (:func:`read_shard` with ``expect``), checked to agree on each
    header key of ``agree`` (a :class:`ShardError` naming the key and the values)."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ShardError("no shard given")
    loaded = [read_shard(p, expect) for p in paths]
    for key in agree:
        values = {json.dumps(meta.get(key), sort_keys=True) for _, meta in loaded}
        if len(values) > 1:
            raise ShardError(f"the shards disagree on {key!r} ({', '.join(sorted(values))}): {paths}")
    common = {key: loaded[0][1].get(key) for key in agree}
    return ShardSet(paths, [t for t, _ in loaded], [m for _, m in loaded], common)
