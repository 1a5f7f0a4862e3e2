"""Prompt datasets: where the rows come from, how a row becomes a prompt and a gold answer, and
the prepared prompt sets every later stage reads.

Sources (``data.source``):

- ``embedded``: the arithmetic prompts written next to the embedded policy (``prompts.jsonl``);
- a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file (its one split is ``train``), or
  a path with a ``{split}`` field (``data/gsm8k_{split}.parquet``: one file per split), or a local
  directory that ``datasets.load_dataset`` reads;
- otherwise a Hugging Face hub dataset id (``openai/gsm8k``, with ``data.config_name: main``).

Splits use the ``datasets`` syntax, slices included (``train``, ``test[:500]``, ``train[10%:]``).
E and U may come from different splits (``data.E_split``, ``data.U_split``; "" = ``data.split``).

Preparation (the ``prepare_data`` stage, :func:`prepare_split`) turns each needed split into a
jsonl file of records ``{"index", "prompt", "answer", "prompt_token_ids"}``: the prompt rendered
with ``data.prompt_template`` and, with ``data.use_chat_template``, the tokenizer's chat template
(``add_generation_prompt``), the gold answer (``data.answer_field``, optionally cut out with
``data.answer_pattern``), and the prompt's token ids. Prompts longer than
``data.max_prompt_tokens`` are dropped and counted (logged and in the stage's summary). The plan
draws prompt ids from these files (an id is a line number of the prepared file), and the rollouts
generate from their token ids, so the plan and the rollouts always see the same prompts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
from pathlib import Path

from .errors import ProbeError
from .input_files import EMBEDDED, PROMPTS_FILE, looks_like_hub_id

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
            rows = datasets.load_dataset(str(Path(source).expanduser()), split=split, cache_dir=cache_dir)
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


# ----------------------------------------------------------------------- prompt and gold answer


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str)
                                                                                  and not value.strip())


def gold_answer(row: dict, data_cfg: dict, where: str) -> str:
    """The gold answer of a row: ``data.answer_field``, cut with ``data.answer_pattern`` (its
    first group, or the whole match). Missing or unmatched: a :class:`DataError`."""
    field = data_cfg["answer_field"]
    value = row.get(field)
    if _missing(value):
        raise DataError(f"{where}: field {field!r} (data.answer_field) is missing, null or empty; "
                        f"the row has fields {sorted(row)}")
    text = str(value)
    pattern = data_cfg.get("answer_pattern") or ""
    if pattern:
        found = re.search(pattern, text, flags=re.DOTALL)
        if found is None:
            raise DataError(f"{where}: data.answer_pattern {pattern!r} does not match the gold field {text[-200:]!r}")
        text = found.group(1) if found.re.groups else found.group(0)
        if not text.strip():
            raise DataError(f"{where}: data.answer_pattern {pattern!r} extracts an empty gold answer")
    return text.strip()


def prompt_text(row: dict, data_cfg: dict, where: str) -> str:
    """The user prompt: ``data.prompt_template`` formatted with the row's fields and ``{prompt}``
    (the ``data.prompt_field`` value), or that field's text as is."""
    field, template = data_cfg["prompt_field"], data_cfg.get("prompt_template") or ""
    if not template:
        value = row.get(field)
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: field {field!r} (data.prompt_field) is missing or empty; "
                            f"the row has fields {sorted(row)}")
        return value
    fields = dict(row)
    if field in row:
        fields["prompt"] = row[field]
    try:
        return template.format_map(fields)
    except KeyError as err:
        raise DataError(f"{where}: data.prompt_template names field {err.args[0]!r}, which the row lacks "
                        f"(fields: {sorted(fields)}); literal braces are written {{{{ and }}}}") from err
    except (IndexError, ValueError) as err:
        raise DataError(f"data.prompt_template {template!r}: {err} (literal braces are written {{{{ and }}}})") from err


def render_prompts(texts: list[str], data_cfg: dict, tokenizer) -> tuple[list[str], list[list[int]]]:
    """(final prompt strings, their token ids). With ``data.use_chat_template`` the text is the
    user message of the tokenizer's chat template (after ``data.system_prompt`` when set), with the
    generation prompt added, tokenized without extra special tokens (the template has them);
    otherwise the text is tokenized as is, with the tokenizer's usual special tokens."""
    if data_cfg.get("use_chat_template"):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.use_chat_template: the tokenizer has no chat template")
        system = data_cfg.get("system_prompt") or ""
        rendered = []
        for text in texts:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        ids = tokenizer(rendered, add_special_tokens=False)["input_ids"] if rendered else []
        return rendered, ids
    if data_cfg.get("system_prompt"):
        raise DataError("data.system_prompt is set but data.use_chat_template is false")
    ids = tokenizer(texts)["input_ids"] if texts else []
    return list(texts), ids


def prepare_split(rows: list[dict], data_cfg: dict, tokenizer, split: str) -> tuple[list[dict], dict]:
    """Prepared records of one split and a report (kept / dropped counts). Row order is kept;
    a record's position in the list is its prompt id."""
    texts, golds = [], []
    for i, row in enumerate(rows):
        where = f"data.source {data_cfg['source']!r}, split {split!r}, row {i}"
        texts.append(prompt_text(row, data_cfg, where))
        golds.append(gold_answer(row, data_cfg, where))
    rendered, ids = render_prompts(texts, data_cfg, tokenizer)
    limit = int(data_cfg.get("max_prompt_tokens") or 0)
    records, dropped = [], []
    for i, (text, gold, token_ids) in enumerate(zip(rendered, golds, ids)):
        if not token_ids:
            raise DataError(f"data.source {data_cfg['source']!r}, split {split!r}, row {i}: the prompt has no tokens")
        if limit and len(token_ids) > limit:
            dropped.append(i)
            continue
        records.append({"index": i, "prompt": text, "answer": gold, "prompt_token_ids": list(token_ids)})
    lengths = [len(r["prompt_token_ids"]) for r in records]
    report = {
        "split": split, "num_rows": len(rows), "num_kept": len(records), "num_dropped_too_long": len(dropped),
        "max_prompt_tokens": limit, "dropped_row_indices_head": dropped[:20],
        "longest_kept_prompt_tokens": max(lengths, default=0),
        "mean_kept_prompt_tokens": sum(lengths) / len(lengths) if lengths else 0.0,
    }
    if dropped:
        log.warning("split %r: %d of %d prompts are longer than data.max_prompt_tokens = %d tokens and are dropped "
                    "(first rows: %s)", split, len(dropped), len(rows), limit, dropped[:10])
    if not records:
        raise DataError(f"split {split!r}: no prompt left (all {len(rows)} rows dropped"
                        + (f" by data.max_prompt_tokens = {limit})" if limit else ")"))
    log.info("split %r: %d prompts kept of %d, longest %d tokens", split, len(records), len(rows), report["longest_kept_prompt_tokens"])
    return records, report


# ------------------------------------------------------------------------ prepared prompt files


def prepared_name(split: str) -> str:
    """File stem of a split's prepared prompts (the split name, made file-safe)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
    if safe != split:
        safe += "-" + hashlib.sha256(split.encode()).hexdigest()[:6]
    return safe


def write_prepared(path: str | Path, records: list[dict]) -> str:
    """Write the records as jsonl (through a temporary name); returns the file's sha256."""
    from .shards import atomic_path

    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def load_prepared(path: str | Path, sha256: str | None = None) -> list[dict]:
    """The records of a prepared prompt file (checked against ``sha256`` when given)."""
    if sha256 is not None and file_sha256(path) != sha256:
        raise DataError(f"{path}: the prepared prompts changed since the plan was made (rerun the plan)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
