"""Prompt sets: rows of a dataset (:mod:`entropy_probe.data`) rendered into prompts and gold
answers, and the prepared prompt files every later stage reads.

Preparation (the ``prepare_data`` stage, :func:`prepare_split`) turns each needed split into a
jsonl file of records ``{"index", "prompt", "answer", "prompt_token_ids"}``: the prompt rendered
with ``data.prompt_template`` and, with ``data.use_chat_template``, the tokenizer's chat template
(``add_generation_prompt``), the gold answer (``data.answer_field``, optionally cut out with
``data.answer_pattern``), and the prompt's token ids. Prompts longer than
``data.max_prompt_tokens`` are dropped and counted (logged and in the stage's report). The plan
draws prompt ids from these files (an id is a line number of the prepared file), and the rollouts
generate from their token ids, so the plan and the rollouts always see the same prompts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path

from .data import DataError

log = logging.getLogger(__name__)


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


def serialize_prepared(records: list[dict]) -> tuple[bytes, str]:
    """The prepared records as jsonl bytes and their sha256 (the plan records it, the rollouts
    check it)."""
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    return blob, hashlib.sha256(blob).hexdigest()


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
