"""One-count progress bars (``info``, ``export``): a rich bar on a terminal, plain periodic log lines otherwise (CI)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class _Plain:
    def __init__(self, label: str, total: int | None, unit: str, every: float = 10.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            of = f"/{self.total}" if self.total else ""
            print(f"{self.label}: {self.done}{of} {self.unit} ({rate:.0f}/s)", file=sys.stderr, flush=True)

    def set_total(self, total: int) -> None:
        self.total = total


class _Rich:
    def __init__(self, progress, task):
        self.p, self.task = progress, task

    def advance(self, n: int = 1) -> None:
        self.p.advance(self.task, n)

    def set_total(self, total: int) -> None:
        self.p.update(self.task, total=total)


@contextmanager
def progress_bar(label: str, total: int | None = None, unit: str = "samples", enabled: bool = True) -> Iterator:
    if not enabled or not sys.stderr.isatty():
        yield _Plain(label, total, unit)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(f"{unit}"), TextColumn("{task.speed:>8.0f}/s" if False else ""), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as p:
        yield _Rich(p, p.add_task(label, total=total))
