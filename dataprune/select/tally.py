"""Counting helpers shared by the in-memory and the streamed selection: label → group codes, the
per-class table, the classes that keep nothing, and per-label counts gathered batch by batch."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import numpy as np

DENSE = 1 << 24  # labels below this are counted in arrays (class numbers); others by value


def group_map(values: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], list]:
    """``_group_codes`` from the distinct candidate labels alone (sorted): a function mapping a batch of
    labels to the same codes, and the label of each code. Used where the labels arrive in batches."""
    values = np.asarray(values, dtype=np.int64)
    if not len(values):
        return (lambda lab: np.zeros(len(lab), dtype=np.intp)), []
    hi = int(values.max())
    if hi < DENSE:
        missing = bool((values < 0).any())
        names: list = list(range(hi + 1)) + ([None] if missing else [])
        return (lambda lab: np.where(lab >= 0, lab, hi + 1).astype(np.intp)), names
    return (lambda lab: np.searchsorted(values, lab).astype(np.intp)), [int(x) if x >= 0 else None for x in values.tolist()]


def as_float(x) -> float:
    """A score bound as recorded: -0.0 is 0.0 (equal scores; which one a min meets first depends on the
    order rows are read, and the in-memory and streamed manifests must be the same bytes)."""
    return float(x) + 0.0


def class_stats(names: list, cand: np.ndarray, kept: np.ndarray, lo: np.ndarray | None, hi: np.ndarray | None) -> dict[str, list]:
    """The per-class table from per-group counts and kept score bounds (±inf where none was kept)."""
    present = np.flatnonzero(cand)
    res: dict[str, list] = {"label": [names[i] for i in present.tolist()], "candidates": cand[present].tolist(),
                            "kept": kept[present].tolist()}
    if lo is not None and hi is not None:
        res["kept_min"] = [as_float(x) if np.isfinite(x) else None for x in lo[present].tolist()]
        res["kept_max"] = [as_float(x) if np.isfinite(x) else None for x in hi[present].tolist()]
    return res


def lost_list(values: np.ndarray, rows: np.ndarray, cand: np.ndarray, kept: np.ndarray,
              classes: list[str] | None) -> list[dict[str, Any]]:
    """Classes (label ``values[i]``, ascending) that have rows but keep none: label, name, rows, candidates."""
    out = []
    for i in np.flatnonzero((rows > 0) & (kept == 0)).tolist():
        label = int(values[i])
        name = classes[label] if classes and label < len(classes) and isinstance(classes[label], str) else None
        out.append({"label": label, "name": name, "rows": int(rows[i]), "candidates": int(cand[i])})
    return out


class LabelCount:
    """Rows per label value over batches: an array below DENSE (index label + 1), a Counter otherwise."""

    def __init__(self) -> None:
        self.dense = np.zeros(0, dtype=np.int64)
        self.sparse: Counter = Counter()

    def add(self, lab: np.ndarray) -> None:
        if not len(lab):
            return
        small = (lab >= -1) & (lab < DENSE)
        if not small.all():
            u, c = np.unique(lab[~small], return_counts=True)
            self.sparse.update(dict(zip(u.tolist(), c.tolist())))
            lab = lab[small]
        c = np.bincount(lab.astype(np.intp) + 1)
        if len(c) > len(self.dense):
            self.dense = np.concatenate([self.dense, np.zeros(len(c) - len(self.dense), dtype=np.int64)])
        self.dense[:len(c)] += c

    def values(self) -> np.ndarray:
        """Every label seen, ascending."""
        v = np.flatnonzero(self.dense).astype(np.int64) - 1
        return np.unique(np.concatenate([v, np.array(sorted(self.sparse), dtype=np.int64)]))

    def at(self, values: np.ndarray) -> np.ndarray:
        out = np.zeros(len(values), dtype=np.int64)
        d = (values >= -1) & (values + 1 < len(self.dense))
        out[d] = self.dense[values[d] + 1]
        for i in np.flatnonzero(~d).tolist():
            out[i] = self.sparse.get(int(values[i]), 0)
        return out


def in_range(score: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    """``--min-score``/``--max-score``: which rows lie inside (NaN never does once a bound is set)."""
    inside = np.ones(len(score), dtype=bool)
    if low is not None:
        inside &= score >= low
    if high is not None:
        inside &= score <= high
    return inside


class KeptTally:
    """What the kept rows add up to, batch by batch (order-free, so a pass may add its rows in any
    split): their number, rows per label, per group code (``lab_map``), the score range per group
    and overall (``float_type`` the score's; None without a score)."""

    def __init__(self, lab_map: Callable[[np.ndarray], np.ndarray] | None, groups: int, float_type=None):
        self.lab_map, self.groups, self.scored = lab_map, groups, float_type is not None
        self.kept = 0
        self.lab = LabelCount()
        self.per = np.zeros(groups, dtype=np.int64)
        dt = float_type or np.float64
        self.lo, self.hi = np.full(groups, np.inf, dtype=dt), np.full(groups, -np.inf, dtype=dt)
        self.range = (np.inf, -np.inf)

    def add(self, lab: np.ndarray, score: np.ndarray | None, keep: np.ndarray) -> None:
        n = int(np.count_nonzero(keep))
        if not n:
            return
        self.kept += n
        kl = lab[keep]
        self.lab.add(kl)
        ks = score[keep] if score is not None else None
        if self.lab_map is not None:
            kc = self.lab_map(kl)
            self.per += np.bincount(kc, minlength=self.groups)
            if ks is not None:
                np.minimum.at(self.lo, kc, ks)
                np.maximum.at(self.hi, kc, ks)
        if ks is not None:
            self.range = (min(self.range[0], ks.min()), max(self.range[1], ks.max()))


class KeptBits:
    """The kept rows of every part as packed bits (one bit a row), recorded by the tally so that the
    write pass need not decide again: it then reads the manifest's columns only."""

    def __init__(self) -> None:
        self.bits: list[np.ndarray] = []
        self.start: list[int] = []
        self.rows = 0

    def add(self, keep: np.ndarray) -> None:
        """The next part's kept rows."""
        self.bits.append(np.packbits(keep))
        self.start.append(self.rows)
        self.rows += len(keep)

    def set(self, rows: np.ndarray) -> None:
        """Mark table rows (ascending or not) kept, after their part was added."""
        if not len(rows):
            return
        part = np.searchsorted(np.asarray(self.start), rows, side="right") - 1
        for p in np.unique(part).tolist():
            off = rows[part == p] - self.start[p]
            np.bitwise_or.at(self.bits[p], off >> 3, (128 >> (off & 7)).astype(np.uint8))

    def part(self, i: int, n: int) -> np.ndarray | None:
        """Part ``i``'s kept rows, or None when it did not have ``n`` rows (the table changed)."""
        if i >= len(self.bits) or (self.start[i + 1] if i + 1 < len(self.start) else self.rows) - self.start[i] != n:
            return None
        return np.unpackbits(self.bits[i], count=n).view(bool)
