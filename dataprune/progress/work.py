"""The whole job as work: its phases, their totals, and the rule that turns them into an ETA.

The rule, in four lines
-----------------------
* **Units.** Every phase counts its work in its own units: samples for ``train`` (a sample once per
  epoch and run), ``embed`` and ``score``; iterations for ``global`` (k-means: one unit per Lloyd
  iteration, plus one for assigning every row).
* **Prior cost.** Each unit has a cost in *eval-sample equivalents* (one forward pass of one
  sample): a training sample costs ``TRAIN_COST`` = 3 (forward + backward ≈ 3 forwards), an
  embedded sample 1, a scored sample one per model it goes through (``--runs`` proxies, plus
  the init models), a k-means iteration over r rows ``r × KMEANS_COST``. These weigh the phases in
  the overall fraction done: Σ done × cost / Σ total × cost.
* **Measured speed.** A phase that has run for ``MEASURE_S`` seconds predicts its own remaining
  units at its own measured seconds per unit (its own time only). A phase that has not run yet is
  predicted at its prior cost × the measured seconds per eval-sample equivalent of the phases that
  ran.
* **ETA** = Σ over phases of remaining units × predicted seconds per unit. Work a resume skipped
  (epochs in a checkpoint) counts as done, never as speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

TRAIN_COST = 3.0
EMBED_COST = 1.0
KMEANS_COST = 1e-3  # per row and iteration: a cosine tile over k centroids is cheap next to a network's forward
CACHED_SCORE_COST = 0.05  # a part written from the embedding cache reads no image
MEASURE_S = 0.5
ORDER = ("train", "embed", "global", "score")


@dataclass
class Phase:
    name: str
    total: Optional[float]  # units; None: not known yet
    cost: float  # eval-sample equivalents per unit
    unit: str = "samples"
    done: float = 0.0  # units done, skipped ones included
    skipped: float = 0.0  # done before this run (resumed): never counted as speed
    seconds: float = 0.0  # this phase's own time, up to ``since``
    since: Optional[float] = None  # when it became the current phase (None: not current)
    finished: bool = False
    label: str = ""

    def elapsed(self, now: float) -> float:
        return self.seconds + (now - self.since if self.since is not None else 0.0)

    def measured(self) -> float:
        return max(0.0, self.done - self.skipped)

    def rate(self, now: float) -> Optional[float]:
        """Units per second over this phase's own time; None before anything was measured."""
        t = self.elapsed(now)
        return self.measured() / t if t > 0 and self.measured() > 0 else None

    def remaining(self) -> Optional[float]:
        if self.finished:
            return 0.0
        return None if self.total is None else max(0.0, self.total - self.done)


class Work:
    """The phases of one job with their own clocks; one phase is current at a time (``enter``)."""

    def __init__(self) -> None:
        self.phases: dict[str, Phase] = {}
        self.current: Optional[str] = None

    def add(self, name: str, total: Optional[float], cost: float, unit: str = "samples") -> Phase:
        ph = self.phases.get(name)
        if ph is None:
            ph = self.phases[name] = Phase(name, total, cost, unit)
        else:
            ph.total, ph.cost, ph.unit = total, cost, unit
        return ph

    def get(self, name: str) -> Optional[Phase]:
        return self.phases.get(name)

    def enter(self, name: str, now: float) -> bool:
        """Make ``name`` the current phase (the previous one's clock stops); True if it changed."""
        if self.current == name:
            return False
        self.pause(now)
        ph = self.phases.get(name) or self.add(name, None, 1.0)
        ph.since, self.current = now, name
        return True

    def pause(self, now: float) -> None:
        ph = self.phases.get(self.current) if self.current else None
        if ph is not None and ph.since is not None:
            ph.seconds += now - ph.since
            ph.since = None
        self.current = None

    def advance(self, name: str, n: float, now: float) -> None:
        self.enter(name, now)
        self.phases[name].done += n

    def skip(self, name: str, n: float) -> None:
        ph = self.phases.get(name) or self.add(name, None, 1.0)
        ph.done += n
        ph.skipped += n

    def finish(self, name: str, now: float) -> None:
        """The phase is complete: its total becomes what it did (estimates are over)."""
        ph = self.phases.get(name)
        if ph is not None:
            ph.total, ph.finished = ph.done, True
            if self.current == name:
                self.pause(now)

    def fraction(self) -> Optional[float]:
        """Weighted fraction done in [0, 1]; None while a phase's total is unknown."""
        tot = done = 0.0
        for ph in self.phases.values():
            if ph.total is None and not ph.finished:
                return None
            tot += (ph.total or 0.0) * ph.cost
            done += min(ph.done, ph.total or 0.0) * ph.cost
        return 1.0 if tot <= 0 else min(1.0, done / tot)

    def sec_per_equiv(self, now: float) -> Optional[float]:
        """Measured seconds per eval-sample equivalent over every phase that did work."""
        t = w = 0.0
        for ph in self.phases.values():
            if ph.measured() > 0 and ph.cost > 0:
                t += ph.elapsed(now)
                w += ph.measured() * ph.cost
        return t / w if w > 0 and t > 0 else None

    def sec_per_unit(self, name: str, now: float) -> Optional[float]:
        ph = self.phases[name]
        if ph.measured() > 0 and (ph.elapsed(now) >= MEASURE_S or ph.finished):
            return ph.elapsed(now) / ph.measured()
        s = self.sec_per_equiv(now)
        return None if s is None else s * ph.cost

    def phase_eta(self, name: str, now: float) -> Optional[float]:
        ph = self.phases.get(name)
        if ph is None:
            return None
        left = ph.remaining()
        if left is None:
            return None
        if left == 0:
            return 0.0
        s = self.sec_per_unit(name, now)
        return None if s is None else left * s

    def eta(self, now: float) -> Optional[float]:
        """Seconds until the whole job is done; None while a total or every speed is unknown."""
        out = 0.0
        for name in self.phases:
            e = self.phase_eta(name, now)
            if e is None:
                return None
            out += e
        return out


def fmt_secs(s: Optional[float]) -> str:
    """``12s``, ``2m10s``, ``1h05m``; ``?`` when unknown."""
    if s is None:
        return "?"
    s = int(round(max(0.0, s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_count(n: Optional[float]) -> str:
    return "?" if n is None else f"{int(round(n))}"


def fmt_rate(r: Optional[float], unit: str) -> str:
    if r is None:
        return f"? {unit}/s"
    return f"{r:.1f} {unit}/s" if r < 10 else f"{r:.0f} {unit}/s"
