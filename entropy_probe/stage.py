"""How a stage runs: one function per rule (:mod:`entropy_probe.stages`) whose signature says
everything — ``cfg`` (the stage's view of the config), the files it reads (:class:`In`), the files
it writes (:class:`Out`) and the values it takes (:class:`Arg`: a job's wildcards, a rule's other
params), each as ``Annotated[type, In("what it is")]``. One adapter maps a Snakemake job onto it (:func:`run_job`,
by the names of the rule's input, output, wildcards and params) and builds the command line of
``python -m entropy_probe run STAGE`` from the same signature (:func:`run_cli`).

Both run the stage inside :func:`stage_run`: logging to stderr and the rule's log file, torch's
thread pool sized by the rule's ``threads``, and a :class:`~entropy_probe.errors.ProbeError` (a
problem with the user's or the stage's inputs) reported as exactly one line, ``ERROR: <message>``,
with exit status 1; any other exception (a bug) keeps its traceback, in the rule's log too.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, get_args, get_origin, get_type_hints

from . import job_cost
from .config import load_config
from .errors import ProbeError
from .stage_keys import stage_config, stage_config_from


@dataclass(frozen=True)
class In:
    """``Annotated[str, In(help)]``: a file the stage reads; ``Annotated[list[str], In(help)]``:
    several, in the rule's order."""

    help: str


@dataclass(frozen=True)
class Out:
    """``Annotated[str, Out(help)]``: a file the stage writes (a list: several)."""

    help: str


@dataclass(frozen=True)
class Arg:
    """``Annotated[int, Arg(help)]``: a value, a job's wildcard or a rule's param, converted to the
    annotated type."""

    help: str


@dataclass(frozen=True)
class Stage:
    """A rule's stage: its function and the name of its defining keys
    (:data:`entropy_probe.stage_keys.STAGE_KEYS`), or a function of its values giving that name
    (the plan of batch E or U); None for a stage that reads no config."""

    run: Callable
    keys: str | Callable[[dict], str] | None = None

    def keys_for(self, values: dict) -> str | None:
        return self.keys(values) if callable(self.keys) else self.keys


Role = In | Out | Arg


def _parameters(fn: Callable) -> list[tuple[str, inspect.Parameter, type, Role | None]]:
    """(name, parameter, type, role) of every parameter of a stage function (``cfg``: no role)."""
    hints = get_type_hints(fn, include_extras=True)
    out = []
    for name, param in inspect.signature(fn).parameters.items():
        hint = hints.get(name)
        role = None
        if get_origin(hint) is Annotated:
            base, *extras = get_args(hint)
            role = next((e for e in extras if isinstance(e, (In, Out, Arg))), None)
            hint = base
        out.append((name, param, hint, role))
    return out


def _is_list(kind) -> bool:
    return get_origin(kind) is list


# --------------------------------------------------------------------------------- the runtime

def setup_logging(log_file: str | Path | None = None) -> None:
    """INFO logs to stderr and, when given, to the rule's log file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", handlers=handlers, force=True
    )


def one_line(err: BaseException) -> str:
    """The error's message on one line (line breaks of wrapped library messages folded)."""
    return re.sub(r"\s*\n\s*", " ", str(err).strip()) or type(err).__name__


def set_threads(threads: int | None) -> None:
    """torch's intra-op thread pool = the rule's ``threads`` (so ``--cores N`` and torch agree);
    nothing to do for a stage that does not use torch."""
    torch = sys.modules.get("torch")
    if threads and torch is not None:
        torch.set_num_threads(int(threads))


def log_peak_cuda_memory() -> None:
    """One log line with the stage's peak CUDA memory (``torch.cuda.max_memory_allocated``), when
    the stage used CUDA: benchmarks/e2e.py reads it beside the rule's benchmark file."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        logging.getLogger("entropy_probe").info("peak CUDA memory %.2f GiB", torch.cuda.max_memory_allocated() / 2**30)


@contextmanager
def stage_run(log_file: str | Path | None = None, threads: int | None = None) -> Iterator[None]:
    """Run a stage's body with logging set up (:func:`setup_logging`). A :class:`ProbeError` is
    logged as exactly one line, ``ERROR: <message>``, to stderr and the rule's log, and the process
    exits with status 1, no traceback. Any other exception (a bug) propagates with its traceback,
    which also goes to the rule's log (on a cluster the console is a scheduler's file)."""
    setup_logging(log_file)
    set_threads(threads)
    try:
        yield
        log_peak_cuda_memory()
    except ProbeError as err:
        bars = getattr(sys.modules.get("tqdm"), "tqdm", None)  # end an open progress bar's line first
        for bar in list(getattr(bars, "_instances", ())):
            bar.close()
        record = logging.LogRecord("entropy_probe", logging.ERROR, __file__, 0, one_line(err), None, None)
        plain = logging.Formatter("%(levelname)s: %(message)s")
        for handler in logging.getLogger().handlers:
            handler.setFormatter(plain)
            handler.handle(record)
            handler.flush()
        raise SystemExit(1) from None
    except Exception:
        record = logging.LogRecord("entropy_probe", logging.ERROR, __file__, 0, "stage failed (a bug):", None,
                                   sys.exc_info())
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):  # stderr gets Python's own traceback
                handler.handle(record)
                handler.flush()
        raise


def config_hash(values: dict) -> str:
    """A short stable hash of a stage's defining values (recorded in shard headers)."""
    blob = json.dumps(values, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------ under Snakemake

def _from_job(smk, name: str, kind, role: Role | None, default):
    """The value of one stage parameter in a Snakemake job: an input or output by its name in the
    rule (lists as lists), a value from the job's wildcards or the rule's params."""
    if isinstance(role, (In, Out)):
        files = smk.input if isinstance(role, In) else smk.output
        value = files.get(name)
        if value is None:
            return default
        return [str(v) for v in value] if _is_list(kind) else str(value)
    value = smk.wildcards.get(name, smk.params.get(name))
    return default if value is None else kind(value)


def job_arguments(smk, stage: Stage) -> dict:
    """The keyword arguments of ``stage.run`` for a Snakemake job (``cfg``: the rule's params
    ``values``, the defining values of its output, with the execution knobs of the job's config)."""
    kwargs = {}
    for name, param, kind, role in _parameters(stage.run):
        default = None if param.default is inspect.Parameter.empty else param.default
        if name == "cfg":
            kwargs[name] = stage_config(smk.params.values, smk.config, stage.keys_for(dict(smk.wildcards.items())))
            continue
        kwargs[name] = _from_job(smk, name, kind, role, default)
        if kwargs[name] is None and param.default is inspect.Parameter.empty:
            raise TypeError(f"rule {smk.rule}: no input, output, wildcard or param named {name!r} for its stage")
    return kwargs


def run_job(smk, stage: Stage) -> None:
    """Run ``stage`` on a Snakemake job's files (the entry point of every rule's script)."""
    with stage_run(smk.log[0], smk.threads):
        job_cost.start(job_cost.label(smk.rule, dict(smk.wildcards.items())))
        stage.run(**job_arguments(smk, stage))


# ----------------------------------------------------------------------------------- by hand

def parser_for(name: str, stage: Stage) -> argparse.ArgumentParser:
    """``python -m entropy_probe run NAME``'s arguments, from the stage function's signature."""
    doc = inspect.getdoc(stage.run) or ""
    parser = argparse.ArgumentParser(prog=f"python -m entropy_probe run {name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for param_name, param, kind, role in _parameters(stage.run):
        if param_name == "cfg":
            parser.add_argument("--config", required=True, metavar="FILE",
                                help="the run's config file (config/config.yaml format; the schema's defaults "
                                     "fill in the rest)")
            continue
        required = param.default is inspect.Parameter.empty
        options = {"help": role.help if role else None, "required": required}
        if not required:
            options["default"] = param.default
        if isinstance(role, (In, Out)):
            options["metavar"] = "FILE"
            if _is_list(kind):
                options["nargs"] = "+"
        else:
            options["type"] = kind
        parser.add_argument(f"--{param_name}", **options)
    return parser


def run_cli(name: str, stage: Stage, argv: list[str]) -> None:
    """Run ``stage`` (rule ``name``) by hand: its files and values as options, the config from
    ``--config``."""
    values = vars(parser_for(name, stage).parse_args(argv))
    with stage_run():
        job_cost.start(job_cost.label(name, values))
        if "config" in values:
            values["cfg"] = stage_config_from(load_config(values.pop("config")), stage.keys_for(values))
        stage.run(**values)
