"""Cross-field checks of a schema-validated config (the schema itself checks types and ranges).

Each failure raises :class:`ConfigError` naming the config key and what is wrong, so a mistake
costs seconds before any job runs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

EMBEDDED = "embedded"


class ConfigError(ValueError):
    """A config value that is invalid in combination with others, or names a missing file."""


def num_e_prompts(batch: dict) -> int:
    """ceil(E_total_sequences / G): E prompts, each with G responses."""
    return math.ceil(batch["E_total_sequences"] / batch["G"])


def embedded_dataset_size(toy: dict) -> int:
    return (toy["max_operand"] + 1) ** 2


def dataset_size(config: dict) -> int:
    """Number of prompts, known before any job runs (the embedded set's size is a function of
    the config; a jsonl file is counted)."""
    source = config["data"]["source"]
    if source == EMBEDDED:
        return embedded_dataset_size(config["toy"])
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"data.source: file {source!r} does not exist")
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def check_config(config: dict) -> None:
    """Raise ConfigError on the first inconsistent value."""
    batch, gen, model = config["batch_config"], config["generation"], config["model"]
    if model["name_or_path"] != EMBEDDED and not Path(model["name_or_path"]).exists():
        raise ConfigError(
            f"model.name_or_path: {model['name_or_path']!r} is not an existing directory "
            "(hub ids are not supported yet; download the checkpoint and give its path)"
        )
    if config["data"]["source"] == EMBEDDED and model["name_or_path"] != EMBEDDED:
        raise ConfigError("data.source: 'embedded' prompts only go with model.name_or_path: embedded")
    if batch["E_total_sequences"] < batch["G"]:
        raise ConfigError(
            f"batch_config.E_total_sequences: {batch['E_total_sequences']} is smaller than "
            f"batch_config.G = {batch['G']} (one prompt group)"
        )
    if config["estimator"]["baseline"] == "loo" and batch["G"] < 2:
        raise ConfigError("estimator.baseline: 'loo' needs batch_config.G >= 2")
    size = dataset_size(config)
    n_e = num_e_prompts(batch)
    if batch["B_U"] > size:
        raise ConfigError(f"batch_config.B_U: {batch['B_U']} distinct prompts > dataset size {size}")
    if batch["E_sampling_mode"] == "distinct" and n_e > size:
        raise ConfigError(
            f"batch_config.E_total_sequences: distinct mode needs ceil({batch['E_total_sequences']}"
            f"/{batch['G']}) = {n_e} prompts > dataset size {size}"
        )
    if batch["E_num_shards"] > n_e:
        raise ConfigError(f"batch_config.E_num_shards: {batch['E_num_shards']} shards > {n_e} E prompts")
    if batch["U_num_shards"] > batch["B_U"]:
        raise ConfigError(f"batch_config.U_num_shards: {batch['U_num_shards']} shards > B_U = {batch['B_U']}")
    if model["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.device: 'cuda' requested but no CUDA device is available")
    if gen["top_p"] <= 0 or gen["top_p"] > 1:  # the schema checks this too; kept for direct callers
        raise ConfigError(f"generation.top_p: {gen['top_p']} is outside (0, 1]")


SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


def _fill_defaults(schema: dict, instance: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = json.loads(json.dumps(sub["default"]))
        if isinstance(instance.get(key), dict):
            _fill_defaults(sub, instance[key])


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """A config file (or {}) plus ``overrides``, validated against the workflow's schema, with
    defaults filled in and cross-checked: what Snakemake's rules see, for running a stage by hand."""
    import jsonschema
    import yaml

    config = yaml.safe_load(Path(path).read_text()) if path else {}
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    _fill_defaults(schema, config)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "(top level)"
        raise ConfigError(f"{where}: {error.message}")
    check_config(config)
    return config


def sweep_etas(estimator: dict) -> list[float]:
    """The η values the SNIS pass evaluates: eta_list, plus −η for each when central differences
    are asked for, sorted."""
    etas = {float(e) for e in estimator["eta_list"]}
    if estimator["central_difference"]:
        etas |= {-e for e in etas}
    return sorted(etas)
