"""Small helpers shared by the stage scripts: logging to the rule's log file, config hashing."""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path


def setup_logging(log_file: str | Path | None = None) -> None:
    """INFO logs to stderr and, when given, to the rule's log file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s", handlers=handlers, force=True
    )


def config_hash(*sections: dict) -> str:
    """A short stable hash of config sections (recorded in shard headers)."""
    blob = json.dumps(sections, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
