"""Loading and checking a config: keys that moved, then the schema (types, ranges, defaults), then
each section's own checks, in the modules that own them. A mistake fails in seconds, before any
job runs, with one :class:`ConfigError` line naming the key.

Torch-free: the Snakefile runs :func:`check_config` while it parses.
"""
from __future__ import annotations

from pathlib import Path

from . import config_schema, data, losses, model_config, plan, reward_config, variants
from .errors import ConfigError
from .input_files import check_state_files

__all__ = ["ConfigError", "check_config", "load_config", "honour_user_mappings"]


def _check_estimator(config: dict) -> None:
    """The one rule that ties the estimator to the batch: a leave-one-out baseline needs another
    response in the group."""
    if config["estimator"]["baseline"] == "loo" and config["batch_config"]["G"] < 2:
        raise ConfigError("estimator.baseline: 'loo' needs batch_config.G >= 2")


def check_config(config: dict) -> None:
    """Each section's checks, on a schema-validated config with its defaults; raises the first
    :class:`ConfigError`."""
    losses.check_config(config)
    model_config.check_config(config)
    data.check_config(config)
    reward_config.check_config(config)
    check_state_files(config["update"], model_config.is_embedded(config["model"]))
    variants.check_config(config)
    _check_estimator(config)
    plan.check_config(config)


def validated(config: dict) -> dict:
    """``config`` (changed in place) with moved keys refused, the schema's defaults filled in,
    validated and cross-checked."""
    config_schema.check_renamed(config)
    config_schema.check_finite(config)
    config_schema.fill_defaults(config)
    config_schema.validate(config)
    check_config(config)
    return config


def honour_user_mappings(config: dict, files: list[str | Path]) -> None:
    """A user's config file means what it says: a mapping value it sets (``update.variants``) is
    that mapping, not merged with another file's (Snakemake merges config files key by key, so
    ``update.variants: {}`` in a later file would not remove an earlier file's variants)."""
    import yaml

    for path in files:
        written = yaml.safe_load(Path(path).read_text()) or {}
        for dotted in config_schema.user_mappings():
            section, key = dotted.split(".", 1)
            if isinstance(written.get(section), dict) and key in written[section]:
                config.setdefault(section, {})[key] = written[section][key]


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> dict:
    """A config file (or {}) plus ``overrides``, on the schema's defaults, validated and
    cross-checked: what Snakemake's rules see, for running a stage by hand."""
    import yaml

    config = yaml.safe_load(Path(path).read_text()) if path else {}
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    return validated(config or {})
