"""Exception hierarchy. The CLI maps each class to an exit code and prints one line, no traceback."""

from __future__ import annotations


class DataPruneError(Exception):
    """Base class for every error a user can cause and fix."""

    exit_code = 1


class ConfigError(DataPruneError):
    """Invalid options or option combinations."""

    exit_code = 2


class SourceError(DataPruneError):
    """A dataset file cannot be read. Names the file (and member or row when known).

    ``reason`` is a short machine-readable tag used when the error is counted as a skip.
    """

    exit_code = 3

    def __init__(self, message: str, *, reason: str = "bad_shard", path: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.path = path


class DecodeError(DataPruneError):
    """Image bytes that cannot be turned into pixels."""

    exit_code = 4

    def __init__(self, message: str, *, reason: str = "decode_error"):
        super().__init__(message)
        self.reason = reason


class TableError(DataPruneError):
    """A score table or manifest is missing, malformed or inconsistent."""

    exit_code = 5


class CheckFailed(DataPruneError):
    """`--strict` found problems."""

    exit_code = 6


_stop_requested = False


def request_stop(signum=None, frame=None) -> None:
    """SIGINT/SIGTERM handler: raise KeyboardInterrupt now, and remember the request — Python drops
    an exception raised while a ``__del__`` or a weakref callback runs, so the long loops also call
    :func:`check_stop` at every batch and a stop is never lost."""
    global _stop_requested
    _stop_requested = True
    raise KeyboardInterrupt


def check_stop() -> None:
    if _stop_requested:
        raise KeyboardInterrupt
