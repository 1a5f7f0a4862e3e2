"""The errors a user can fix: a bad config value, a missing or unreadable model, adapter,
optimizer state or dataset file, a bad row, a reward that cannot be computed, a shard that does
not match, a non-finite value. A stage reports one as a single line (``ERROR: <message>``,
:func:`entropy_probe.stage.stage_run`) and exits with status 1; any other exception is a bug and
keeps its traceback."""
from __future__ import annotations


class ProbeError(Exception):
    """A problem with the user's inputs or a stage's inputs, reported as one line."""


class ConfigError(ValueError, ProbeError):
    """A config value that is invalid in itself or with others, or names a missing file: the
    message starts with the dotted key (``batch_config.B_U: ...``)."""
