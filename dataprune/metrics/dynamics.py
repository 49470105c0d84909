"""Training-dynamics metrics (kind ``train``): forgetting events (Toneva et al. 2019) and the area
under the margin (Pleiss et al. 2020), from per-sample statistics gathered while a proxy trains.

``DynStats`` keeps, per shard, arrays over ``(run, row)`` — never a Python object per sample: the
last correctness, forgetting transitions, whether the sample was ever learned, and the margin sum
and count. A ``train`` metric's ``compute(stats, epochs)`` turns one shard's arrays into per-run values.
"""

from __future__ import annotations

import numpy as np

from .base import INF, Metric, register


def forgetting(a: dict[str, np.ndarray], epochs: int) -> np.ndarray:
    per = np.where(a["learned"], a["forget"], epochs + 1).astype(np.float64)
    return np.where(a["mcount"] > 0, per, np.nan)


def aum(a: dict[str, np.ndarray], epochs: int) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return -a["msum"] / a["mcount"]  # minus the mean margin


register(Metric("forgetting", "train", True, True, 0.0, INF,
                "learned→forgotten transitions across epochs; never learned = epochs + 1 (Toneva et al. 2019)", compute=forgetting))
register(Metric("aum", "train", True, True, -INF, INF,
                "minus the area under the margin: -(mean over epochs of assigned logit - largest other logit) (Pleiss et al. 2020)",
                compute=aum))


class DynStats:
    """Per-sample training statistics for R runs, in growable arrays per shard."""

    FIELDS = {"prev": np.int8, "forget": np.int32, "learned": np.bool_, "msum": np.float64, "mcount": np.int32}

    def __init__(self, runs: int, epochs: int):
        self.runs, self.epochs = runs, epochs
        self.shards: dict[int, dict[str, np.ndarray]] = {}

    def _arrays(self, sidx: int, need: int) -> dict[str, np.ndarray]:
        a = self.shards.get(sidx)
        if a is None or a["prev"].shape[1] < need:
            cap = max(need, 2 * (a["prev"].shape[1] if a else 0), 256)
            new = {k: np.zeros((self.runs, cap), t) for k, t in self.FIELDS.items()}
            new["prev"][:] = -1
            if a is not None:
                n = a["prev"].shape[1]
                for k in new:
                    new[k][:, :n] = a[k]
            self.shards[sidx] = a = new
        return a

    def update(self, run: int, shard: np.ndarray, row: np.ndarray, correct: np.ndarray, margin: np.ndarray) -> None:
        for sidx in np.unique(shard):
            sel = shard == sidx
            r, c, m = row[sel], correct[sel], margin[sel]
            a = self._arrays(int(sidx), int(r.max()) + 1)
            prev = a["prev"][run, r]
            a["forget"][run, r] += (prev == 1) & ~c
            a["learned"][run, r] |= c
            a["prev"][run, r] = c
            a["msum"][run, r] += m
            a["mcount"][run, r] += 1

    def values(self, metric, sidx: int, nrows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean over runs, std over runs, per-run (nrows, R)) of a ``train`` metric for one shard."""
        per = metric.compute(self._arrays(sidx, nrows), self.epochs)[:, :nrows].T
        with np.errstate(invalid="ignore"):
            std = per.std(1, ddof=1) if self.runs > 1 else np.zeros(nrows)
        return per.mean(1), std, per

    def presented(self, sidx: int, nrows: int) -> np.ndarray:
        """Per row: did every run train on it at least once? (A row never presented — e.g. the last
        sample of a batch of one — has no training statistics: its values are NaN by design.)"""
        return (self._arrays(sidx, nrows)["mcount"][:, :nrows] > 0).all(0)

    def state(self, only: set[int] | None = None) -> dict:
        """Tensors per shard; ``only``: just these shards (a torchrun rank sends the shards it trains on)."""
        import torch

        return {str(k): {f: torch.from_numpy(v.copy()) for f, v in a.items()} for k, a in self.shards.items()
                if only is None or k in only}

    def load(self, state: dict) -> None:
        self.shards = {int(k): {f: v.numpy().astype(self.FIELDS[f]) for f, v in a.items()} for k, a in state.items()}
