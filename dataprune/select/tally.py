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
    if hi < (1 << 24):
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
