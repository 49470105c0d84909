"""Metric contract and registry: each metric is registered with the callable that computes it.

Every score column means the same thing: **higher = harder** (a metric that flags rows instead says
so in ``direction``). A metric declares what it needs (labels, proxy training, embeddings), the
range its values must fall in — checked at runtime before a part is written — and ``compute``, whose
signature is fixed by its ``kind``:

* ``eval``:  ``compute(logits, labels) -> (B,) tensor`` — the trained (or given) model's outputs;
* ``init``:  ``compute(model, x, labels, cfg) -> (B,) tensor`` — a model at initialisation;
* ``train``: ``compute(stats, epochs) -> (R, n) array`` — per-run values from the per-sample
  training statistics of one shard (``dynamics.DynStats.arrays``);
* ``embed``: ``compute(es) -> {column: (N,) array}`` — from every embedded row at once
  (``embeddings.EmbeddingSet``: the matrix, labels, ids, hashes and a shared k-means fit).
* ``text``: no model. ``compute`` is a :class:`TextPass`: ``shard(docs, cfg) -> {name: array}``
  runs in the data workers on one shard's documents (``str``) and its arrays are saved per shard;
  ``combine(ts) -> {column: (N,) array}`` then sees every shard's arrays (``engine.text.TextSet``)
  and returns the columns of every document (on rank 0 under torchrun; the other ranks may help
  through ``ts`` and return None).

The engine never names a metric: adding one is one module with ``register(Metric(...))`` (imported
by ``metrics/__init__.py``); ``tests/test_metrics_contract.py`` then runs it through the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import DataPruneError
from ..registry import Registry
from ..tables import DIRECTION

KINDS = ("eval", "init", "train", "embed", "text")



@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # one of KINDS (see the module docstring for what each kind's compute receives)
    needs_labels: bool
    needs_training: bool
    low: float  # documented range (inclusive); math.inf allowed
    high: float
    description: str
    extra_columns: tuple[str, ...] = ()  # non-score columns the metric adds (e.g. cluster ids)
    columns: tuple[str, ...] | None = None  # its float32 score columns (default: one, named after the metric)
    compute: Callable[..., Any] | None = None
    direction: str = DIRECTION  # what its values mean; a metric without score columns flags rows instead
    params: Callable[[Any], dict] | None = None  # run options its values depend on (recorded in the table's metadata)

    @property
    def score_columns(self) -> tuple[str, ...]:
        return (self.name,) if self.columns is None else self.columns


METRICS: Registry[Metric] = Registry("metric", lambda name, names: f"unknown metric {name!r}; available: {', '.join(sorted(names))}")


def register(metric: Metric) -> Metric:
    if metric.kind not in KINDS:
        raise ValueError(f"metric {metric.name}: kind must be one of {', '.join(KINDS)}, not {metric.kind!r}")
    if metric.compute is None:
        raise ValueError(f"metric {metric.name}: register it with the callable that computes it (compute=...)")
    if metric.kind == "text" and not (callable(getattr(metric.compute, "shard", None)) and callable(getattr(metric.compute, "combine", None))):
        raise ValueError(f"metric {metric.name}: a text metric's compute has shard(docs, cfg) and combine(ts) (a TextPass)")
    return METRICS.add(metric.name, metric)


def unregister(name: str) -> None:
    METRICS.remove(name)


def list_metrics() -> list[str]:
    return sorted(METRICS)


def get_metric(name: str) -> Metric:
    return METRICS.lookup(name)


def in_registry_order(metrics) -> list[Metric]:
    """``metrics`` in the order they were registered (fixes the column order of computed columns)."""
    order = {name: i for i, name in enumerate(METRICS)}
    return sorted(metrics, key=lambda m: order.get(m.name, len(order)))


class TextPass:
    """A ``text`` metric's two steps (see the module docstring); subclasses implement both."""

    def shard(self, docs: list[str], cfg) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def combine(self, ts) -> dict[str, np.ndarray] | None:
        raise NotImplementedError


class MetricRangeError(DataPruneError):
    exit_code = 7


def check_range(name: str, values: np.ndarray) -> None:
    """Reject values outside the metric's documented range (NaN = not scored, allowed)."""
    m = get_metric(name)
    v = values[~np.isnan(values)]
    if v.size and (v.min() < m.low - 1e-4 or v.max() > m.high + 1e-4):
        raise MetricRangeError(f"metric {name}: values in [{v.min():.4g}, {v.max():.4g}] fall outside its range [{m.low}, {m.high}]")


INF = math.inf
