"""The README and docs/ cannot go stale: every block made from the code or a recorded run is what
docs/generate.py makes now; every file, config key and ``module.name`` they name in a code span
exists; every YAML block is a valid partial config; every number in their prose is checked here;
every bash block says how tests/test_recipes.py runs it. (That the recipes run, and that the
recorded sample matches a fresh quick-start run, is tests/test_recipes.py.)"""
from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import yaml

from entropy_probe import config_schema, stage_keys
from entropy_probe.config import load_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "docs"))
import generate  # noqa: E402  (docs/generate.py)

DOCUMENTS = generate.DOCUMENTS
MAX_README_LINES = 200
RECIPE_KINDS = ("setup", "default-run", "full", "dry", "cluster")
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.S | re.M)
MARKER = re.compile(r"<!-- recipe: ([a-z-]+) -->\s*$")
# top-level entries of the repository a path in the docs may start with
REPO_ROOTS = ("entropy_probe/", "tests/", "config/", "workflow/", "benchmarks/", "docs/", "profiles/", "ci/",
              "scripts/", ".test/", ".ci/")
REPO_FILES = ("Snakefile", "README.md", "pyproject.toml")
FILE_SUFFIXES = ("html", "py", "json", "jsonl", "txt", "png", "yaml", "md", "safetensors", "pt", "bin", "rst", "tsv")


def _pyproject() -> str:
    return (REPO / "pyproject.toml").read_text()


def _canonical_one():
    one = load_config(None, {"update": {"max_grad_norm": 1}})
    one_point_o = load_config(None, {"update": {"max_grad_norm": 1.0}})
    return stage_keys.rule_params(one, "update_vector") == stage_keys.rule_params(one_point_o, "update_vector")


# Every number with a decimal point or an exponent in the prose (outside generated blocks and code
# blocks), with the check that makes it true.
NUMBERS = {
    # the build the test command installs (and .ci/run runs that command)
    "2.13": lambda: all("pip install torch==2.13.0 " in c for k, c in bash_blocks(REPO / "README.md") if k == "setup"),
    "2.2": lambda: '"torch>=2.2"' in _pyproject(),
    "1.0": _canonical_one,
}


def prose(text: str) -> str:
    """``text`` without its generated blocks and fenced code."""
    text = generate.BLOCK.sub("", text)
    return FENCE.sub("", text)


def code_spans(text: str) -> list[str]:
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose(text))


def bash_blocks(path: Path) -> list[tuple[str, str]]:
    """(recipe kind or "", commands) of every ```bash block, in order."""
    text = path.read_text()
    out = []
    for match in FENCE.finditer(text):
        if match.group(2) != "bash":
            continue
        before = text[:match.start()].rstrip("\n").splitlines()
        marker = MARKER.search(before[-1]) if before else None
        out.append((marker.group(1) if marker else "", match.group(3)))
    return out


def test_the_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, len(lines)
    headings = [line for line in lines if line.startswith("## ")]
    # "probe your model" and "probe a TRL run" within the first screenful of sections
    assert "## Probe your model" in headings[:4] and "## Probe a TRL run" in headings[:5], headings


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_generated_blocks_are_current(path):
    text = path.read_text()
    assert text == generate.regenerate(text), f"{path.name} is stale: python docs/generate.py"


def test_every_generated_block_is_filled():
    names = [m.group("name") for path in DOCUMENTS for m in generate.BLOCK.finditer(path.read_text())]
    assert sorted(set(names)) == sorted(generate.GENERATORS), names
    for path in DOCUMENTS:
        for match in generate.BLOCK.finditer(path.read_text()):
            assert match.group("body").strip(), (path.name, match.group("name"))


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_bash_block_says_how_it_is_run(path):
    blocks = bash_blocks(path)
    for kind, commands in blocks:
        assert kind in RECIPE_KINDS, f"{path.name}: a bash block without <!-- recipe: KIND --> ({RECIPE_KINDS}):\n{commands}"


def test_the_readme_commands_are_the_setup_blocks():
    setup = [commands.strip() for kind, commands in bash_blocks(REPO / "README.md") if kind == "setup"]
    assert setup == ['pip install torch==2.13.0 -e . && snakemake --cores 2',
                     'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q']


def _path_exists(span: str) -> bool:
    pattern = re.sub(r"<[^>]+>", "*", span.split()[0]).rstrip("/")
    pattern = re.sub(r"\{([^}]*)\}", "*", pattern)
    return any(REPO.glob(pattern)) if "*" in pattern else (REPO / pattern).exists()


def _config_key(span: str) -> bool:
    schema = config_schema.schema()["properties"]
    section, _, key = span.partition(".")
    return section in schema and (key == "*" or key in schema[section]["properties"])


def _module_name(span: str) -> bool:
    module, _, name = span.rpartition(".")
    try:
        return hasattr(importlib.import_module(f"entropy_probe.{module}"), name)
    except ImportError:
        return False


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_file_key_and_function_named_exists(path):
    sections = tuple(config_schema.schema()["properties"])
    missing = []
    for span in code_spans(path.read_text()):
        span = span.strip()
        if span.startswith(".test/results"):  # written by a run (tests/test_recipes.py checks results/)
            continue
        if span.startswith(REPO_ROOTS) or span in REPO_FILES:
            if not _path_exists(span):
                missing.append(f"file {span}")
        elif re.fullmatch(r"[a-z_]+\.[A-Za-z_][A-Za-z_0-9]*|[a-z_]+\.\*", span) and not span.endswith(FILE_SUFFIXES):
            if span.split(".")[0] in sections or (REPO / "entropy_probe" / f"{span.split('.')[0]}.py").exists():
                if not (_config_key(span) or _module_name(span)):
                    missing.append(f"key or name {span}")
    assert not missing, missing


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_link_resolves(path):
    text = prose(path.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), (path.name, target)
        if anchor and linked.suffix == ".md":
            headings = [re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)]
            assert anchor in headings, (path.name, target, headings)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_yaml_block_is_a_valid_config(path):
    for match in FENCE.finditer(path.read_text()):
        if match.group(2) == "yaml":
            load_config(None, yaml.safe_load(match.group(3)))


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_number_in_the_prose_is_checked(path):
    numbers = re.findall(r"(?<![\w.])(\d+\.\d+|\d+(?:\.\d+)?e-?\d+)(?![\w])", prose(path.read_text()))
    unchecked = sorted(set(numbers) - set(NUMBERS))
    assert not unchecked, f"{path.name}: numbers without a check in tests/test_docs.py NUMBERS: {unchecked}"
    for number in set(numbers):
        assert NUMBERS[number](), number


def test_what_the_docs_say_of_the_sample():
    """docs/science.md: at the smallest η the exact sampler change and the exact frozen-nucleus
    change have opposite signs (the nucleus boundary at work)."""
    import json

    first = json.loads((generate.SAMPLE / "summary.json").read_text())["rows"][0]
    assert first["exact_delta_h"] * first["exact_delta_h_sampler"] < 0
    assert "opposite signs" in (REPO / "docs" / "science.md").read_text()
