"""Config validation (schema, then cross-field checks): every bad value fails before any job runs,
with a message naming the key."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from entropy_probe import config_schema
from entropy_probe.config import ConfigError, load_config
from entropy_probe.config_schema import RENAMED

REPO = Path(__file__).resolve().parents[1]
GOOD = REPO / "config" / "config.yaml"


def test_good_config_loads_with_defaults_filled():
    config = load_config(GOOD)
    written = yaml.safe_load(GOOD.read_text())
    for section, values in written.items():
        for key, value in values.items():
            assert config[section][key] == value, f"{section}.{key}"
    # every section of the schema exists, also those the file leaves out
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert set(config) == set(schema["properties"]) >= {"model", "toy", "data", "batch_config", "generation"}
    assert load_config(None)["model"]["name_or_path"] == "embedded"  # the schema defaults alone pass


BAD = [
    # (overrides, key the message must name)
    ({"batch_config": {"E_total_sequences": -5}}, "batch_config.E_total_sequences"),
    ({"generation": {"top_p": 0}}, "generation.top_p"),
    ({"generation": {"top_p": 1.5}}, "generation.top_p"),
    ({"batch_config": {"E_sampling_mode": "stratified"}}, "batch_config.E_sampling_mode"),
    ({"bogus_section": {"x": 1}}, "bogus_section"),
    ({"generation": {"bogus_key": 1}}, "bogus_key"),
    ({"batch_config": {"B_U": 401}}, "batch_config.B_U"),  # the default toy has 20 x 20 prompts
    ({"toy": {"max_operand": 9}, "batch_config": {"B_U": 101}}, "batch_config.B_U"),
    ({"model": {"name_or_path": "/nonexistent/checkpoint"}}, "model.name_or_path"),
    ({"batch_config": {"E_total_sequences": 3, "G": 4}}, "batch_config.E_total_sequences"),
    ({"batch_config": {"G": 1}, "estimator": {"baseline": "loo"}}, "estimator.baseline"),
    ({"batch_config": {"E_total_sequences": 8, "G": 4, "E_num_shards": 3}}, "batch_config.E_num_shards"),
    ({"batch_config": {"B_U": 2, "U_num_shards": 3}}, "batch_config.U_num_shards"),
    ({"batch_config": {"E_sampling_mode": "distinct", "E_total_sequences": 4 * 401}}, "batch_config.E_total_sequences"),
    ({"data": {"source": "/nonexistent/prompts.jsonl"}}, "data.source"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[key + "-" + str(i) for i, (_, key) in enumerate(BAD)])
def test_bad_value_raises_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(GOOD, overrides)
    assert key in str(info.value)


def test_the_limits_themselves_pass():
    load_config(GOOD, {"batch_config": {"B_U": 400, "U_num_shards": 400}})
    load_config(GOOD, {"batch_config": {"E_sampling_mode": "distinct", "E_total_sequences": 4 * 400}})
    load_config(GOOD, {"batch_config": {"E_total_sequences": 4, "G": 4, "E_num_shards": 1}})
    load_config(GOOD, {"batch_config": {"G": 1, "E_num_shards": 1}, "estimator": {"baseline": "none"}})
    load_config(GOOD, {"generation": {"top_p": 1.0}})


@pytest.mark.parametrize("old", sorted(f"{s}.{k}" for s, k in RENAMED))
def test_a_key_that_moved_fails_with_one_line_naming_its_new_place(old):
    section, key = old.split(".")
    new = RENAMED[(section, key)].split(" ")[0]
    with pytest.raises(ConfigError) as info:
        load_config(None, {section: {key: 1}})
    message = str(info.value)
    assert message.startswith(f"{old}: renamed to {new}") and "\n" not in message
    new_section, new_key = new.split(".")
    assert new_key in config_schema.schema()["properties"][new_section]["properties"], new  # the new place exists


def _snakemake(workdir, *args):
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("section,key,value", [
    ("batch_config", "E_total_sequences", -5),  # caught by the schema
    ("batch_config", "B_U", 401),  # caught by the cross-field check
])
def test_snakemake_rejects_a_bad_config_before_any_job(tmp_path, section, key, value):
    config = yaml.safe_load(GOOD.read_text())
    config[section][key] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    work.mkdir()
    result = _snakemake(work, "-n", "--configfile", str(bad))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert key in output
    assert not (work / "results").exists()


def test_package_does_not_import_snakemake():
    package = REPO / "entropy_probe"
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "snakemake" for n in names), f"{path.name} imports snakemake"
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for p in package.rglob("*.py")
                     if p.stem not in ("__init__", "__main__"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "assert not any(k == 'snakemake' or k.startswith('snakemake.') for k in sys.modules), 'snakemake imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_snakefile_parse_time_imports_are_torch_free():
    """The Snakefile is parsed by every job on a cluster: what it imports, and the config check
    it runs, must not import torch (seconds per job)."""
    rules = "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    rules += (REPO / "Snakefile").read_text()
    modules = set(re.findall(r"^\s*(?:from|import) (entropy_probe[\w.]*)", rules, flags=re.M))
    modules |= {f"entropy_probe.{m}" for m in re.findall(r"^\s*from entropy_probe import (\w+)", rules, flags=re.M)}
    modules = sorted(modules)
    assert {"entropy_probe.config", "entropy_probe.data", "entropy_probe.input_files"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from entropy_probe.config import load_config\n"
        f"load_config({str(GOOD)!r})\n"
        "assert 'torch' not in sys.modules, 'torch imported at parse time'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def _jobs(workdir, *args):
    from workflow_util import dry_run_jobs_with

    return dry_run_jobs_with(workdir, *args)


def test_a_users_config_file_means_what_it_says(tmp_path):
    """With --configfile, the workflow reads the user's file on the schema's defaults, never merged
    into config/config.yaml: an empty mapping there (update.variants: {}) means none, and a key the
    file leaves out takes the schema's default. With several files, a later file's mapping replaces
    an earlier one's."""
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    default = yaml.safe_load(GOOD.read_text())
    default["update"]["variants"] = {"dapo": {"loss_type": "dapo"}}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(default))
    assert _jobs(work)["variant_directional"] == 2  # config/config.yaml alone: its variant runs
    (work / "none.yaml").write_text("update:\n  variants: {}\n")
    jobs = _jobs(work, "--configfile", str(work / "none.yaml"))
    assert not any(rule.startswith("variant_") for rule in jobs), jobs
    assert "exact_reference" not in jobs  # max_new_tokens is the schema's 256, not config.yaml's 3
    (work / "some.yaml").write_text(yaml.safe_dump({"update": {"variants": {"dapo": {"loss_type": "dapo"}}}}))
    assert _jobs(work, "--configfile", str(work / "some.yaml"))["variant_directional"] == 2
    jobs = _jobs(work, "--configfile", str(work / "some.yaml"), str(work / "none.yaml"))
    assert not any(rule.startswith("variant_") for rule in jobs), jobs
