"""Average ranks and Spearman correlation: the one implementation that selection (``--by a,b``)
and the split-half reliability of ``score --runs`` share."""

from __future__ import annotations

import math

import numpy as np


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing the mean of their ranks (as scipy.stats.rankdata, minus 1)."""
    _, inv, cnt = np.unique(np.asarray(a), return_inverse=True, return_counts=True)
    avg = (np.cumsum(cnt) - cnt) + (cnt - 1) / 2.0
    return avg[inv.reshape(-1)].astype(np.float64, copy=False)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    d = math.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / d) if d else float("nan")
