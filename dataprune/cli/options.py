"""Options shared by several commands, declared once: the dataset options, the error policy, the
output-path check, and the small parsers for comma lists."""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Callable, Optional

import typer

from ..config import MAX_WORKERS, ScoreConfig, default
from ..errors import ConfigError

SOURCE_OPTIONS = {  # the options of every command that reads a dataset (see ``reads_data``)
    "format": (Optional[str], typer.Option(None, "--format", help="wds | folder | parquet | jsonl (default: detected from the path).")),
    "image_column": (Optional[str], typer.Option(None, "--image-column", help="Parquet: column holding image bytes (default: image, "
                                                 "img, jpg, ...).")),
    "label_column": (Optional[str], typer.Option(None, "--label-column", help="Parquet: label column (default: label, labels, cls).")),
    "key_column": (Optional[str], typer.Option(None, "--key-column", help="Parquet: key column (default: key, __key__, id; else "
                                               "the row number). JSON Lines: key field (default id; else the line number).")),
    "text_column": (Optional[str], typer.Option(None, "--text-column", help="Text corpora (JSON Lines, parquet, .json members): "
                                                "the field holding the document (default text).")),
    "shard_files": (Optional[int], typer.Option(None, "--shard-files", help="Image folders: files per virtual shard (default 10000).")),
}

DATA_HELP = "Dataset: tar shards (dir, file, brace pattern, list file), image folder, parquet or JSON Lines."


def reads_data(fn: Callable) -> Callable:
    """Give a command the dataset options (``--format``, parquet columns, ``--shard-files``): it
    receives ``format`` and ``source_options`` (a dict of the others) instead."""
    sig = inspect.signature(fn)
    own = [q for q in sig.parameters.values() if q.name not in ("format", "source_options")]
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann) for k, (ann, opt) in SOURCE_OPTIONS.items()]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        fmt = kwargs.pop("format", None)
        opts = {k: v for k in SOURCE_OPTIONS if k != "format" and (v := kwargs.pop(k, None)) is not None}
        return fn(*args, format=fmt, source_options=opts, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)
    return wrapper


def on_error_option():
    return typer.Option(None, "--on-error", help="Per-sample problems: skip (counted by reason; default) or raise.")


def d(name: str, cls=ScoreConfig) -> str:
    """`` (default X)`` for a config field, for help texts."""
    return f" (default {default(cls, name)})"


def csv(text: Optional[str], cast=str, what: str = "--keep") -> Optional[tuple]:
    if text is None:
        return None
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} must be numbers separated by commas, not {text!r}") from None


def jobs_option(text: str) -> int:
    """``--jobs``: a number of processes (≥ 1), or ``auto`` (0 in the config: the export decides)."""
    if text.strip().lower() == "auto":
        return 0
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_WORKERS:
        raise ConfigError(f"--jobs must be auto or a whole number from 1 to {MAX_WORKERS}, not {text!r}")
    return n


def check_out(path: Optional[Path | str], kind: str, option: str = "--out") -> None:
    """Refuse, as a usage error (exit 2), an output path of the wrong kind: a directory where a file
    is written, or a file (or a link to nowhere) where a directory is."""
    if path is None:
        return
    p = os.fspath(path)
    if kind == "dir" and (os.path.isfile(p) or (os.path.islink(p) and not os.path.exists(p))):
        raise ConfigError(f"{option} {p} is a file, not a directory: choose a directory (it is created when missing)")
    if kind == "file" and os.path.isdir(p):
        raise ConfigError(f"{option} {p} is a directory: give the file to write, e.g. {os.path.join(p, 'manifest.parquet')}")


def shell_path(p: str) -> str:
    """A path as it would be typed in a shell (quoted when needed), for next-step lines."""
    import shlex

    return shlex.quote(p)
