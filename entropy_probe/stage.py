"""What every stage script shares: its entry point (run by Snakemake or by hand), the stage's view
of the config, logging to the rule's log file, torch's thread pool sized by the rule's
``threads``, one-line errors, config hashing."""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ProbeError


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


def rule_config(smk) -> dict:
    """The config a rule's script sees: its params (the defining values, see
    :mod:`entropy_probe.stage_keys`) and the execution knobs of ``snakemake.config``."""
    from .stage_keys import stage_config

    return stage_config(smk.params.values, smk.config)


def config_for(path: str | Path, stage: str) -> dict:
    """The same view of a config file, for running stage ``stage`` by hand."""
    from .config import load_config
    from .stage_keys import stage_config_from

    return stage_config_from(load_config(path), stage)


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
    """Run a stage's body with logging set up (:func:`setup_logging`). A :class:`ProbeError` (a
    problem with the user's or the stage's inputs) is logged as exactly one line,
    ``ERROR: <message>``, to stderr and the rule's log, and the process exits with status 1, no
    traceback. Any other exception (a bug) propagates with its traceback, which also goes to the
    rule's log (on a cluster the console is a scheduler's file)."""
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


def run_stage(namespace: dict, main, cli: list, from_snakemake, stage=None) -> None:
    """The entry point of a stage script, called at its end with ``globals()``.

    Under Snakemake (a ``snakemake`` object in ``namespace``): ``main(**from_snakemake(smk))``, with
    ``cfg`` = :func:`rule_config` first when the stage reads the config (``stage`` set). By hand
    (``__name__ == "__main__"``): the script's docstring is the help, ``cli`` lists the arguments —
    a name, or (name, help), or (name, help, argparse keywords); names with ``--`` are options —
    and the config file comes first when ``stage`` is set (a stage name, or a function of the
    parsed arguments giving it). Both run inside :func:`stage_run`; ``main``'s parameters are the
    argument names."""
    smk = namespace.get("snakemake")
    if smk is not None:
        with stage_run(smk.log[0], smk.threads):
            main(**({"cfg": rule_config(smk)} if stage else {}), **from_snakemake(smk))
        return
    if namespace.get("__name__") != "__main__":
        return
    parser = argparse.ArgumentParser(description=namespace.get("__doc__"),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if stage:
        parser.add_argument("config", help="the run's config file (config/config.yaml format)")
    for spec in cli:
        name, help_text, extra = (spec, None, {}) if isinstance(spec, str) else (*spec, {})[:3]
        parser.add_argument(name, help=help_text, **extra)
    values = vars(parser.parse_args())
    with stage_run():
        if stage:
            path = values.pop("config")
            values["cfg"] = config_for(path, stage(values) if callable(stage) else stage)
        main(**values)
