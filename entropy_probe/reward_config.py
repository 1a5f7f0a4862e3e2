"""The ``reward`` section, checked before any job runs: a custom reward's module or file is found
and read (never run: the workflow checks the config every time it starts) and binds the function
it names; the rewards that need math-verify find it. The rewards themselves are
:mod:`entropy_probe.rewards`.

Torch-free: the Snakefile runs these checks while it parses.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

from .errors import ConfigError

NEEDS_MATH_VERIFY = ("math", "think_answer_math")


def _binds(tree, name: str) -> bool:
    """Whether a module's top-level code (not function or class bodies) binds ``name``: a def, a
    class, an assignment or an import. A star import or module-level dynamic code (globals(),
    exec, setattr, a module __getattr__) counts as binding it: only a run could tell."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name in (name, "__getattr__"):
                return True
            stack.extend(node.decorator_list)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any(a.name == "*" or (a.asname or a.name.split(".")[0]) == name for a in node.names):
                return True
        elif isinstance(node, ast.Name) and node.id == name and isinstance(node.ctx, ast.Store):
            return True
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "globals", "exec", "setattr", "vars"):
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def check_source(target: str, func: str) -> None:
    """The custom reward's file, or module (found with importlib's find_spec from the working
    directory, as the rollouts import it), exists, parses, and binds ``func`` at top level. The
    source is read, never run (the workflow checks the config every time it starts)."""
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward.function: file {target!r} does not exist")
    else:
        cwd = str(Path.cwd())
        added = "" not in sys.path and cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            spec = importlib.util.find_spec(target)
        except (ImportError, ValueError) as err:  # a parent package that is missing or fails to import
            raise ConfigError(f"reward.function: cannot import {target!r} ({type(err).__name__}: {err})") from err
        finally:
            if added:
                sys.path.remove(cwd)
        if spec is None:
            raise ConfigError(f"reward.function: module {target!r} not found (neither installed nor a file "
                              f"{target.replace('.', '/')}.py under the working directory {cwd})")
        if not (spec.origin or "").endswith(".py"):
            return  # a compiled or namespace module: checked when the rollouts load it
        path = Path(spec.origin)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as err:
        raise ConfigError(f"reward.function: cannot read {str(path)!r} ({type(err).__name__}: {err})") from err
    if not _binds(tree, func):
        raise ConfigError(f"reward.function: {str(path)!r} defines no {func!r} (no top-level def, class, "
                          "assignment or import of that name)")


def check_config(config: dict) -> None:
    """The ``reward`` section: a custom reward's function can be found (read, never run), and the
    packages a reward needs are installed; a :class:`ConfigError` naming the key."""
    reward = config["reward"]
    name, function = reward["name"], reward.get("function", "")
    if name == "custom":
        target, sep, func = function.rpartition(":")
        if not sep or not target or not func:
            raise ConfigError(f"reward.function: {function!r} is not 'module:function' or 'path/to/file.py:function' "
                              "(needed by reward.name: custom)")
        check_source(target, func)
    elif function:
        raise ConfigError(f"reward.function is set but reward.name is {name!r}, not 'custom'")
    if name in NEEDS_MATH_VERIFY and importlib.util.find_spec("math_verify") is None:
        raise ConfigError(f"reward.name: {name!r} needs the math-verify package (pip install math-verify)")
