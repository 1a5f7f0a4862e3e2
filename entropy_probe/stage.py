"""Small helpers shared by the stage scripts: logging to the rule's log file, one-line errors,
config hashing."""
from __future__ import annotations

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


@contextmanager
def stage_run(log_file: str | Path | None = None) -> Iterator[None]:
    """Run a stage's body with logging set up (:func:`setup_logging`). A :class:`ProbeError` (a
    problem with the user's or the stage's inputs) is logged as exactly one line,
    ``ERROR: <message>``, to stderr and the rule's log, and the process exits with status 1, no
    traceback. Any other exception (a bug) propagates with its traceback, which also goes to the
    rule's log (on a cluster the console is a scheduler's file)."""
    setup_logging(log_file)
    try:
        yield
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


def config_hash(*sections: dict) -> str:
    """A short stable hash of config sections (recorded in shard headers)."""
    blob = json.dumps(sections, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
