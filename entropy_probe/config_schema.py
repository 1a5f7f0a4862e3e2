"""The config's schema (``workflow/schemas/config.schema.yaml``), the one description of every
key: validation with one-line errors, defaults, the keys that moved, the keys whose value is a
mapping the user names (replaced as a whole, never merged), and the table of every key that
``config/README.md`` is generated from (``python -m entropy_probe config-docs``).

Torch-free: the Snakefile uses it while it parses.
"""
from __future__ import annotations

import copy
import json
import math
from functools import lru_cache
from pathlib import Path

from .errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"

# keys that moved: a config that still uses the old place gets told the new one
RENAMED = {
    ("update", "loss_normalization"): "update.loss_type (TRL and verl names; token_mean and seq_mean_token_mean "
                                      "keep working, seq_mean_token_sum_max_len is now "
                                      "seq_mean_token_sum_prompt_max_len)",
    ("generation", "autocast_dtype"): "model.precision (float32 | bfloat16; it sets the precision of every "
                                      "model pass: generation, X, Y, the directional pass and SNIS)",
    ("generation", "tf_batch_size"): "teacher_forcing.batch_size",
    ("generation", "tf_chunk_tokens"): "teacher_forcing.chunk_tokens",
    ("generation", "gradient_checkpointing"): "teacher_forcing.gradient_checkpointing",
    ("generation", "rb_requires_grad"): "estimator.pathwise_term",
    ("batch_config", "rollout_batch_size"): "generation.rollout_batch_size",
    ("batch_config", "scale_rewards"): "update.scale_rewards",
    ("estimator", "param_filter"): "model.param_filter",
}


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return SCHEMA_PATH.read_text()


def schema() -> dict:
    """The schema as a dict (a fresh copy)."""
    import yaml

    return yaml.safe_load(_schema_text())


def check_renamed(config: dict) -> None:
    """Before the schema: a key that moved fails with one line naming its new place."""
    for (section, key), new in RENAMED.items():
        if key in (config.get(section) or {}):
            raise ConfigError(f"{section}.{key}: renamed to {new}")


def fill_defaults(config: dict, node: dict | None = None) -> None:
    """Every key the config leaves out gets the schema's default (in place; sections too)."""
    node = schema() if node is None else node
    for key, sub in node.get("properties", {}).items():
        if key not in config and "default" in sub:
            config[key] = copy.deepcopy(sub["default"])
        if isinstance(config.get(key), dict):
            fill_defaults(config[key], sub)


def validate(config: dict) -> None:
    """Types, ranges and unknown keys, as one :class:`ConfigError` naming the key."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema()).iter_errors(config))
    if error is not None:
        raise ConfigError(f"{dotted_path(error.absolute_path)}: {error.message}")


def check_finite(node, path: tuple = ()) -> None:
    """Every number of the config is finite: a NaN or an infinity (YAML ``.nan``, ``.inf``) would
    pass the schema's type and range checks and poison every later number (a :class:`ConfigError`
    naming the key)."""
    if isinstance(node, dict):
        for key, value in node.items():
            check_finite(value, (*path, key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_finite(value, (*path, i))
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{dotted_path(path)}: {node} is not a finite number")


def dotted_path(path) -> str:
    return ".".join(map(str, path)) or "(top level)"


def _keys(node: dict, prefix: str = ""):
    """(dotted key, its schema node) of every leaf key, in the schema's order."""
    for key, sub in node.get("properties", {}).items():
        dotted = f"{prefix}{key}"
        if "properties" in sub:
            yield from _keys(sub, dotted + ".")
        else:
            yield dotted, sub


@lru_cache(maxsize=1)
def number_keys() -> frozenset[str]:
    """Dotted keys the schema types as ``number`` (or arrays of numbers): 1 and 1.0 are one value."""
    return frozenset(k for k, sub in _keys(schema())
                     if sub.get("type") == "number" or sub.get("items", {}).get("type") == "number")


@lru_cache(maxsize=1)
def user_mappings() -> tuple[str, ...]:
    """Dotted keys whose value is a mapping the user names (``update.variants``): a config file
    that sets one sets all of it, so an empty mapping means none."""
    return tuple(k for k, sub in _keys(schema()) if sub.get("type") == "object")


def _type_of(sub: dict) -> str:
    if "enum" in sub:
        return " \\| ".join(json.dumps(v) for v in sub["enum"])
    kind = sub.get("type", "")
    kinds = kind if isinstance(kind, list) else [kind]
    if "array" in kinds and "items" in sub:
        kinds = [f"list of {sub['items'].get('type', 'value')}" if k == "array" else k for k in kinds]
    return " or ".join(kinds)


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def keys_table() -> str:
    """``config/README.md``: every key of the schema with its type, default and meaning, section
    by section (generated: ``python -m entropy_probe config-docs > config/README.md``)."""
    root = schema()
    lines = ["# Configuration keys", "",
             "Generated from `workflow/schemas/config.schema.yaml` by `python -m entropy_probe config-docs`; "
             "`tests/test_config_docs.py` checks that it is current. Without `--configfile` the workflow runs "
             "`config/config.yaml`; with one, that file alone on top of these defaults.", ""]
    for section, node in root["properties"].items():
        lines += [f"## `{section}`", "", _one_line(node.get("description", "")), "",
                  "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for dotted, sub in _keys(node, f"{section}."):
            default = json.dumps(sub["default"], ensure_ascii=False) if "default" in sub else ""
            lines.append(f"| `{dotted}` | {_type_of(sub)} | `{default}` | {_one_line(sub.get('description', ''))} |")
        lines.append("")
    moved = [f"| `{section}.{key}` | {_one_line(new)} |" for (section, key), new in RENAMED.items()]
    lines += ["## Keys that moved", "", "A config that still uses one of these fails with one line naming "
              "its new place.", "", "| old key | now |", "| --- | --- |", *moved, ""]
    return "\n".join(lines)
