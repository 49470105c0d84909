"""Progress reporting: a rich bar on a terminal, plain periodic log lines otherwise (CI)."""

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


@contextmanager
def score_reporter(enabled: bool = True) -> Iterator:
    """Turns engine events into a rich display (TTY) or log lines (CI)."""
    tty = enabled and sys.stderr.isatty()
    state = {"last": 0.0, "samples": 0, "t0": time.monotonic(), "train": 0}
    if not tty:
        def report(kind: str, info: dict) -> None:
            if not enabled:
                return
            now = time.monotonic()
            if kind == "plan":
                print(f"score: {info['todo']} shard(s) to score ({info['done']} already done) on {info['device']}, "
                      f"image size {info['image_size']}, metrics {', '.join(info['metrics'])}", file=sys.stderr, flush=True)
            elif kind == "train_epoch":
                print(f"train run {info['run']} epoch {info['epoch']}/{info['epochs']}: loss {info['loss']:.3f} "
                      f"acc {info['acc']:.3f} ({info['samples'] / max(info['seconds'], 1e-9):.0f} samples/s)", file=sys.stderr, flush=True)
            elif kind == "resume":
                print(f"train run {info['run']}: resuming after epoch {info['epoch']}", file=sys.stderr, flush=True)
            elif kind == "curve_run":
                print(f"curve: keep {info['strategy']} {info['fraction']:g} (repeat {info['repeat']}): {info['kept']} rows, "
                      f"{info['epochs']} epochs → test error {100 * info['test_error']:.2f}%", file=sys.stderr, flush=True)
            elif kind == "shard":
                state["samples"] += info["seen"]
                if now - state["last"] > 10:
                    state["last"] = now
                    t = info["timings"]
                    print(f"score: {state['samples']} samples ({state['samples'] / max(info['elapsed'], 1e-9):.0f}/s) · "
                          f"wait {t['read']:.1f}s compute {t['compute']:.1f}s write {t['write']:.1f}s", file=sys.stderr, flush=True)
        yield report
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as p:
        tasks: dict = {}

        def report(kind: str, info: dict) -> None:
            if kind == "plan":
                tasks["score"] = p.add_task("score (shards)", total=info["todo"], info=f"{info['device']}")
            elif kind == "train_step":
                key = ("train", info["run"], info["epoch"])
                if key not in tasks:
                    tasks[key] = p.add_task(f"train run {info['run']} epoch {info['epoch'] + 1}", total=None, info="")
                p.advance(tasks[key], info["samples"])
            elif kind == "train_epoch":
                key = ("train", info["run"], info["epoch"] - 1)
                if key in tasks:
                    p.update(tasks[key], total=info["samples"], completed=info["samples"],
                             info=f"loss {info['loss']:.3f} acc {info['acc']:.3f}")
            elif kind == "shard":
                state["samples"] += info["seen"]
                t = info["timings"]
                rate = state["samples"] / max(info["elapsed"], 1e-9)
                p.update(tasks["score"], advance=1, info=f"{state['samples']} samples · {rate:.0f}/s · wait {t['read']:.0f}s "
                         f"compute {t['compute']:.0f}s write {t['write']:.0f}s")

        yield report
