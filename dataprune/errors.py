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


class Incomplete(DataPruneError):
    """A run wrote fewer samples than it was asked for (moved data, missing files, fetch errors);
    what it wrote is complete and described (e.g. ``index.json``). ``--allow-missing`` accepts it."""

    exit_code = 8


class OutputLocked(DataPruneError):
    """Another process is writing the same output directory."""

    exit_code = 9


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


DECODE_REASONS = ("decode_error", "too_large")  # sample problems found while decoding (DecodeError); the rest are SourceError


class OnError:
    """The error policy of a run, as one object (webdataset's ``handler=``): ``skip`` counts a bad
    sample or a damaged shard and goes on, ``raise`` stops at the first one. Callers count after
    ``sample``/``shard`` return; under ``raise`` those calls do not return."""

    MODES = ("skip", "raise")
    DEFAULT = "skip"  # per-sample problems never stop a run unless asked to
    __slots__ = ("mode",)

    def __init__(self, mode: "str | OnError | None" = None):
        mode = mode.mode if isinstance(mode, OnError) else (self.DEFAULT if mode is None else mode)
        if mode not in self.MODES:
            raise ConfigError("--on-error must be 'skip' or 'raise'")
        self.mode = mode

    @property
    def raises(self) -> bool:
        return self.mode == "raise"

    def sample(self, s) -> None:
        """A sample (``sources.Sample``) whose ``status`` is not ok: raise its error under ``raise``."""
        if self.raises:
            msg = s.error or f"{s.loc_path}: sample {s.key!r}: {s.status}"
            if s.status in DECODE_REASONS:
                raise DecodeError(msg, reason=s.status)
            raise SourceError(msg, reason=s.status, path=s.loc_path)

    def shard(self, e: SourceError) -> None:
        """A damaged shard (the samples read before the damage stay usable): re-raise under ``raise``."""
        if self.raises:
            raise e

    def __repr__(self) -> str:
        return f"OnError({self.mode!r})"
