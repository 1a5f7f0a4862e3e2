"""pyproject.toml declares every distribution the package, the scripts and the tests import (the
package's in ``dependencies``, the tests' in the ``test`` extra), so a fresh virtual environment
with ``pip install -e ".[test]"`` runs the suite; nothing leans on what a machine happens to have."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCAL = {"entropy_probe", "conftest", "workflow_util", "toy_batches", "trl_harness", "standins", "browser",
         "generate", "test_architecture", "test_chunked", "test_docs"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported(paths) -> set[str]:
    out = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.add(node.module.split(".")[0])
    return {name for name in out if name not in sys.stdlib_module_names and name not in LOCAL}


def _declared(requirements: list[str]) -> set[str]:
    return {_normal(re.split(r"[<>=!\[; ]", req, maxsplit=1)[0]) for req in requirements}


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    found = packages_distributions()
    missing = sorted(m for m in modules if m not in found)
    assert not missing, f"imported but not installed: {missing}"
    return {m: {_normal(d) for d in found[m]} for m in modules}


def test_the_package_declares_what_it_imports():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _declared(project["dependencies"])
    code = [*(REPO / "entropy_probe").rglob("*.py"), *(REPO / "scripts").glob("*.py")]
    undeclared = {m: d for m, d in _distributions(_imported(code)).items() if not d & declared}
    assert not undeclared, f"imported by the package, not in [project] dependencies: {undeclared}"


def test_the_test_extra_declares_what_the_tests_import():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _declared(project["dependencies"]) | _declared(project["optional-dependencies"]["test"])
    code = [*(REPO / "tests").glob("*.py"), *(REPO / "docs").glob("*.py")]
    undeclared = {m: d for m, d in _distributions(_imported(code)).items() if not d & declared}
    assert not undeclared, f"imported by the tests, not declared: {undeclared}"
