"""``score_reporter``: the engine's events as one overall bar with an ETA and a line for the current
phase (rich, on a terminal), or as timestamped log lines (CI, files, pipes).

Off a terminal a line is printed at each phase change and phase end, after each epoch, and while
work advances at most every ``DATAPRUNE_PROGRESS_EVERY`` seconds (float, default 30) — and at
least every 30 s: larger values are lowered to 30. ``0`` prints a line for every event (tests)::

    2026-12-01 11:20:03 [ 37%] ETA 2m10s · train run 1/2 epoch 3/10 · 1200/4800 samples · 85 samples/s

``[ 37%]`` is the whole job done (weighted, see :mod:`dataprune.progress.work`), ``ETA`` the
whole job's; then the current phase, its own count/total and its own rate (its own time only).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, TextIO

from .job import PHASE, SUB, Job
from .work import fmt_count, fmt_rate, fmt_secs

DEFAULT_EVERY = 30.0
MAX_EVERY = 30.0
ENV = "DATAPRUNE_PROGRESS_EVERY"


def every_s() -> float:
    """The log-line interval off a terminal: $DATAPRUNE_PROGRESS_EVERY seconds, in [0, 30]."""
    raw = os.environ.get(ENV, "").strip()
    try:
        v = float(raw) if raw else DEFAULT_EVERY
    except ValueError:
        v = DEFAULT_EVERY
    return min(max(v, 0.0), MAX_EVERY) if v == v else DEFAULT_EVERY


def stamp(t: float) -> str:
    """Local time as ``2026-12-01 11:20:03``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _pct(f: Optional[float]) -> str:
    return "  ?%" if f is None else f"{int(100 * f + 1e-9):3d}%"  # floor: 100% only when everything is done


def status(job: Job, now: float) -> str:
    """``[ 37%] ETA 2m10s · <phase label> · done/total unit · rate``."""
    w = job.work
    text = f"[{_pct(w.fraction())}] ETA {fmt_secs(w.eta(now))}"
    ph = w.get(job.shown) if job.shown else None
    if ph is not None:
        text += (f" · {ph.label or ph.name} · {fmt_count(ph.done)}/{fmt_count(ph.total)} {ph.unit} · "
                 f"{fmt_rate(ph.rate(now), ph.unit)}")
    return text


class Lines:
    """The display off a terminal: timestamped lines on ``out``."""

    def __init__(self, every: float, out: TextIO, wall: Callable[[], float] = time.time):
        self.every, self.out, self.wall = every, out, wall
        self.last: Optional[float] = None

    def _print(self, text: str) -> None:
        print(f"{stamp(self.wall())} {text}", file=self.out, flush=True)

    def show(self, job: Job, what: Optional[str], msg: Optional[str], now: float) -> None:
        if msg is not None:
            self._print(f"[{_pct(job.work.fraction())}] ETA {fmt_secs(job.work.eta(now))} · {msg}" if what else msg)
            self.last = now
        if what is None or (msg is not None and what == SUB):
            return
        due = self.last is None or now - self.last >= self.every
        if what == PHASE or due:
            self._print(status(job, now))
            self.last = now


class RichView:
    """The display on a terminal: an overall bar (% and ETA of the whole job) and the current phase."""

    def __init__(self, progress):
        self.p = progress
        self.overall = progress.add_task("overall", total=1000, count="  0%", rate="", eta="ETA ?")
        self.phase = progress.add_task("", total=None, count="", rate="", eta="", visible=False)
        self.phase_name: Optional[str] = None

    def finish(self, job: Job) -> None:
        """The overall bar at the end: complete when every phase finished."""
        f = job.work.fraction()
        if f is not None and f >= 1.0:
            self.p.update(self.overall, total=1000, completed=1000, count="100%", eta="ETA 0s")

    def show(self, job: Job, what: Optional[str], msg: Optional[str], now: float) -> None:
        w = job.work
        if msg is not None:
            self.p.console.print(msg, markup=False, highlight=False)
        f = w.fraction()
        self.p.update(self.overall, total=1000 if f is not None else None, completed=int(1000 * (f or 0.0)),
                      count=_pct(f).strip(), eta=f"ETA {fmt_secs(w.eta(now))}")
        ph = w.get(job.shown) if job.shown else None
        if ph is None:
            return
        if ph.name != self.phase_name:
            self.p.reset(self.phase)
            self.phase_name = ph.name
        self.p.update(self.phase, description=f"  {ph.label or ph.name}", total=ph.total, completed=ph.done, visible=True,
                      count=f"{fmt_count(ph.done)}/{fmt_count(ph.total)} {ph.unit}", rate=fmt_rate(ph.rate(now), ph.unit),
                      eta=f"ETA {fmt_secs(w.phase_eta(ph.name, now))}")


def make_report(view, job: Optional[Job] = None, clock: Callable[[], float] = time.monotonic):
    """``report(kind, info)`` folding events into ``job`` and showing them on ``view``. A failure of
    the display is reported once and never stops the run."""
    job = job or Job()
    broken: list = []

    def report(kind: str, info: dict) -> None:
        if broken:
            return
        try:
            now = clock()
            what, msg = job.on(kind, info, now)
            view.show(job, what, msg, now)
        except Exception as e:  # noqa: BLE001 — progress is never worth a failed run
            broken.append(e)
            print(f"note: progress display stopped ({type(e).__name__}: {e})", file=sys.stderr, flush=True)

    report.job = job  # type: ignore[attr-defined]
    return report


@contextmanager
def score_reporter(enabled: bool = True) -> Iterator[Callable[[str, dict], None]]:
    """Turns engine events into a rich display (TTY) or timestamped log lines (CI)."""
    if not enabled:
        yield lambda kind, info: None
        return
    if not sys.stderr.isatty():
        yield make_report(Lines(every_s(), sys.stderr))
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"),
                  TextColumn("{task.fields[rate]}"), TextColumn("[cyan]{task.fields[eta]}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as p:
        view = RichView(p)
        report = make_report(view)
        yield report
        view.finish(report.job)
