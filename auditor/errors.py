"""The small exception family whose classes carry the CLI exit code."""

from __future__ import annotations


class AuditorError(Exception):
    """Base of every error the CLI turns into an exit code."""

    exit_code = 2


class UsageError(AuditorError):
    """Bad arguments or a request that cannot be honoured as asked."""

    exit_code = 2


class ConfigError(AuditorError):
    """Invalid configuration; the message names the key."""

    exit_code = 2


class StateError(AuditorError):
    """The state database cannot be opened or has a schema we do not know."""

    exit_code = 2


class StorageError(AuditorError):
    """Storage could not be reached or listed: the scan cannot complete."""

    exit_code = 3


class StorageIOError(StorageError, OSError):
    """A storage failure caught at the public API (auditor.api.storage_boundary), naming the URL.

    Still an OSError, as what it wraps mostly was: callers that caught OSError keep working.
    """


class CheckpointRefused(AuditorError):
    """A checkpoint failed verification and was not loaded."""

    exit_code = 1

    def __init__(self, message: str, verdict: object | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict
