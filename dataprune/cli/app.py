"""The Typer application, the error wrapper every command goes through, and the entry point.

Every command module registers on ``app`` through ``command``: a ``DataPruneError`` becomes one red
line and its exit code, Ctrl-C exit 130, a closed pipe (``dataprune select | head -1``) a quiet exit
0, an operating-system error (disk full, permission denied) one line and exit 1 — never a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional

import typer

from ..errors import DataPruneError

HELP = ("Make image training sets smaller and better: score every example, select the subset to keep, export it.\n\n"
        "Typical job: dataprune score DATA --metric el2n; dataprune select --keep hard --frac 0.8; dataprune export --to wds")

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags without a type placeholder, readable in CI logs
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    help=HELP,
)


def _plain_usage_names() -> None:
    """Usage lines as POSIX and the README write them: ``DATA``, ``[OUT]``, ``[SCORES]...`` (typer's own
    ``{DATA}`` for required arguments reads like a set)."""
    from typer.core import TyperArgument

    if not hasattr(TyperArgument, "_usage_display_name"):  # another typer: keep its own spelling
        return

    def usage_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    TyperArgument._usage_display_name = usage_name


_plain_usage_names()


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as _v

    try:
        return _v("dataprune")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"dataprune {version()}")
        raise typer.Exit(0)


@app.callback(invoke_without_command=True)
def _root(ctx: typer.Context,
          show_version: Optional[bool] = typer.Option(None, "--version", "-V", callback=_show_version, is_eager=True,
                                                      help="Print the version and exit.")):
    if ctx.invoked_subcommand is None:  # bare `dataprune`: the overview, exit 0
        typer.echo(ctx.get_help())
        raise typer.Exit(0)


def err(msg: str) -> None:
    from .. import render

    render.err_console().print(f"[bold red]error:[/] {msg}", markup=True)


def _quiet_pipe() -> None:
    """The reader went away (``| head``): send what is left to /dev/null so exit does not fail again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
    except OSError:
        pass


def command(fn: Callable) -> Callable:
    """Register a command; turn user errors into one line and an exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataPruneError as e:
            err(str(e).replace("[", "\\["))
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            err("interrupted; finished parts are kept and a rerun resumes")
            raise typer.Exit(130)
        except BrokenPipeError:
            _quiet_pipe()
            raise typer.Exit(0)
        except OSError as e:  # disk full, permission denied, ...: the environment, not a bug
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            err(f"{where}{e.strerror or e}".replace("[", "\\["))
            raise typer.Exit(1)

    return app.command()(wrapper)


def next_step(where: str, command_line: str | None) -> None:
    """The line every command ends with: where its output went and what to run next."""
    line = f"→ {where}" + (f" · next: {command_line}" if command_line else "")
    from .. import render

    render.console().print(line, markup=False, highlight=False)


def main() -> None:
    import signal

    from ..errors import request_stop

    # SIGTERM takes the same clean path as Ctrl-C: temp files removed, finished parts kept
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        app()
    except BrokenPipeError:
        _quiet_pipe()
        sys.exit(0)
    finally:  # the command has cleaned up: a stop signal from here on (e.g. torchrun stopping the
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ranks after one failed) just ends the process,
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # never a KeyboardInterrupt inside interpreter shutdown
