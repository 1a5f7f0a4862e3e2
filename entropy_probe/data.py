"""Prompt datasets: where the rows come from, which split each batch reads, how many there are,
and the checks of the ``data`` section. Turning rows into prompts is :mod:`entropy_probe.prompts`.

Sources (``data.source``):

- ``embedded``: the arithmetic prompts written next to the embedded policy (``prompts.jsonl``);
- a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file (its one split is ``train``), or
  a path with a ``{split}`` field (``data/gsm8k_{split}.parquet``: one file per split), or a local
  directory that ``datasets.load_dataset`` reads (a downloaded dataset repository, with its
  ``data.config_name``);
- otherwise a Hugging Face hub dataset id (``openai/gsm8k``, with ``data.config_name: main``).

Splits use the ``datasets`` syntax, slices included (``train``, ``test[:500]``, ``train[10%:]``).
E and U may come from different splits (``data.E_split``, ``data.U_split``; "" = ``data.split``).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import string
import tempfile
from pathlib import Path

from .errors import ConfigError, ProbeError
from .input_files import EMBEDDED, PROMPTS_FILE, looks_like_hub_id
from .model_config import is_embedded

log = logging.getLogger(__name__)

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError, ProbeError):
    """A dataset that cannot be read, or a row without a usable prompt or gold answer."""


# ------------------------------------------------------------------------------ where rows live


def split_base(split: str) -> str:
    """``test[:500]`` -> ``test``."""
    return split.split("[", 1)[0].strip()


def kind_splits(data_cfg: dict) -> dict[str, str]:
    """The split of each batch: {"E": ..., "U": ...}."""
    return {kind: data_cfg.get(f"{kind}_split") or data_cfg.get("split", "train") for kind in ("E", "U")}


def source_kind(source: str) -> str:
    """``embedded``, ``file`` (one local file, or a ``{split}`` path), ``dir`` (a local directory)
    or ``hub``. A local-looking source that does not exist is a :class:`DataError`."""
    if source == EMBEDDED:
        return "embedded"
    if "{split}" in source:
        return "file"
    path = Path(source).expanduser()
    if path.is_dir():
        return "dir"
    if path.is_file():
        return "file"
    if path.suffix.lower() in FILE_BUILDERS or not looks_like_hub_id(source):
        raise DataError(f"data.source: {source!r} does not exist (a local file or directory was meant: "
                        "give an existing path, or a hub dataset id such as 'openai/gsm8k')")
    return "hub"


def local_file(source: str, split: str) -> tuple[Path, str]:
    """(file, split expression to read it with) for a file source: ``{split}`` is replaced by the
    split's base name and the file is read as its ``train`` split (slices kept); a single file
    has only the ``train`` split."""
    base = split_base(split)
    if "{split}" in source:
        path = Path(source.replace("{split}", base)).expanduser()
        if not path.is_file():
            raise DataError(f"data.source: {source!r} with split {base!r}: file {str(path)!r} does not exist")
        read_as = "train" + split[len(base):].strip() if "[" in split else "train"
    else:
        path = Path(source).expanduser()
        if base != "train":
            raise DataError(f"split {split!r}: data.source {source!r} is one file, whose only split is 'train' "
                            "(slices like 'train[:100]' are fine; put {split} in the path for one file per split)")
        read_as = split
    if path.suffix.lower() not in FILE_BUILDERS:
        raise DataError(f"data.source: {str(path)!r} is not a {'/'.join(sorted(FILE_BUILDERS))} file")
    return path, read_as


def _count_rows(path: Path) -> int | None:
    """Rows of a local file without loading it with ``datasets`` (None when not cheap to know)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path) as f:
                return sum(1 for line in f if line.strip())
        if suffix == ".json":
            text = path.read_text()
            try:
                obj = json.loads(text)
            except ValueError:  # JSON lines in a .json file
                return sum(1 for line in text.splitlines() if line.strip())
            if isinstance(obj, list):
                return len(obj)
            return None
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if suffix == ".csv":
            import csv

            with open(path, newline="") as f:
                return max(0, sum(1 for row in csv.reader(f) if row) - 1)  # minus the header
    except OSError as err:
        raise DataError(f"data.source: cannot read {str(path)!r} ({err})") from err
    return None


def raw_size(config: dict, split: str) -> int | None:
    """Rows of ``split`` before any filtering, where that is known without loading the dataset
    (the embedded set, local files, no slice); None otherwise (the plan checks the sizes)."""
    data = config["data"]
    kind = source_kind(data["source"])
    if "[" in split:
        return None
    if kind == "embedded":
        if split != "train":
            raise DataError(f"split {split!r}: the embedded prompt set has only the 'train' split")
        return (config["toy"]["max_operand"] + 1) ** 2
    if kind == "file":
        return _count_rows(local_file(data["source"], split)[0])
    return None


def input_files(data_cfg: dict, split: str) -> list[str]:
    """The local files a data source reads for ``split`` (the workflow's dependency tracking)."""
    kind = source_kind(data_cfg["source"])
    if kind == "file":
        return [str(local_file(data_cfg["source"], split)[0])]
    if kind == "dir":
        return sorted(str(p) for p in Path(data_cfg["source"]).expanduser().rglob("*") if p.is_file())
    return []


def load_rows(data_cfg: dict, split: str, policy_dir: str | Path | None = None) -> list[dict]:
    """The rows of ``split`` as dicts, in dataset order (via ``datasets``). Hub datasets are
    fetched here: an unreachable one is a :class:`DataError`."""
    import datasets

    source = data_cfg["source"]
    kind = source_kind(source)
    cache_dir = tempfile.mkdtemp(prefix="entropy_probe_datasets_")  # local files: never a stale cache
    try:
        if kind in ("embedded", "file"):
            if kind == "embedded":
                if split_base(split) != "train":
                    raise DataError(f"split {split!r}: the embedded prompt set has only the 'train' split")
                path, read_as = Path(policy_dir) / PROMPTS_FILE, split
            else:
                path, read_as = local_file(source, split)
            rows = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split=read_as,
                                         cache_dir=cache_dir)
        elif kind == "dir":
            rows = datasets.load_dataset(str(Path(source).expanduser()), data_cfg.get("config_name") or None,
                                         split=split, cache_dir=cache_dir)
        else:
            try:
                rows = datasets.load_dataset(source, data_cfg.get("config_name") or None, split=split)
            except Exception as err:
                raise DataError(f"data.source: hub dataset {source!r} (config {data_cfg.get('config_name') or None!r}, "
                                f"split {split!r}) could not be loaded: {type(err).__name__}: {err}") from err
        return [dict(row) for row in rows]
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"data.source {source!r}, split {split!r}: {type(err).__name__}: {err}") from err
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------- checks


def check_config(config: dict) -> None:
    """The ``data`` section: the source exists (local files, every split's), fits the model, and
    the template, pattern and chat options make sense; a :class:`ConfigError` naming the key."""
    data = config["data"]
    try:
        kind = source_kind(data["source"])
        if kind == "file":
            for split in set(kind_splits(data).values()):
                local_file(data["source"], split)
    except DataError as err:
        raise ConfigError(str(err)) from err
    if kind == "embedded" and not is_embedded(config["model"]):
        raise ConfigError("data.source: 'embedded' prompts only go with the embedded policy (model.name_or_path: "
                          "embedded, no model.checkpoint); give the prompt file")
    if data.get("config_name") and kind not in ("hub", "dir"):
        raise ConfigError("data.config_name: only dataset repositories (a hub id or a local directory) have "
                          "configurations; a file source has none")
    if data.get("system_prompt") and not data.get("use_chat_template"):
        raise ConfigError("data.system_prompt: only used with data.use_chat_template: true")
    if data.get("answer_pattern"):
        try:
            re.compile(data["answer_pattern"])
        except re.error as err:
            raise ConfigError(f"data.answer_pattern: {data['answer_pattern']!r} is not a regex ({err})") from err
    template = data.get("prompt_template") or ""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ConfigError(f"data.prompt_template: {err} (literal braces are written {{{{ and }}}})") from err
    if any(not f or f.isdigit() for f in fields):
        raise ConfigError("data.prompt_template: fields must be named ({prompt} or a field of the rows); "
                          "literal braces are written {{ and }}")


def dataset_size(config: dict, kind: str) -> int | None:
    """Number of prompts of batch ``kind``'s split before filtering, where it is known before any
    job runs (:func:`raw_size`); None for hub datasets and sliced splits."""
    try:
        return raw_size(config, kind_splits(config["data"])[kind])
    except DataError as err:
        raise ConfigError(str(err)) from err
