"""config/README.md is the schema's own table of every key (generated, so it cannot drift), and
every key of the schema is in it with its default."""
from __future__ import annotations

from pathlib import Path

from entropy_probe import config_schema

REPO = Path(__file__).resolve().parents[1]


def test_config_readme_is_what_the_schema_generates():
    assert (REPO / "config" / "README.md").read_text() == config_schema.keys_table(), (
        "config/README.md is stale: python -m entropy_probe config-docs > config/README.md")


def test_every_schema_key_is_a_row_with_its_default():
    table = (REPO / "config" / "README.md").read_text()
    schema = config_schema.schema()
    for section, node in schema["properties"].items():
        for key in node["properties"]:
            assert f"| `{section}.{key}` |" in table, f"{section}.{key}"
    for (section, key), _ in config_schema.RENAMED.items():
        assert f"| `{section}.{key}` |" in table
