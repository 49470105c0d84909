"""Metric contract and registry.

Every metric column means the same thing: **higher = harder**. A metric declares what it needs
(labels, proxy training, embeddings) and the range its values must fall in; the engine checks the
range at runtime before writing a part. Adding a metric = one ``register(Metric(...))`` plus its
computation in the module that owns its kind; the contract tests in ``tests/test_metrics_contract.py``
run every registered metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, DataPruneError


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # "eval": final proxy model; "train": training dynamics; "init": model at initialisation; "embed": encoder features
    needs_labels: bool
    needs_training: bool
    low: float  # documented range (inclusive); math.inf allowed
    high: float
    description: str
    extra_columns: tuple[str, ...] = ()  # non-score columns the metric adds (e.g. cluster ids)
    columns: tuple[str, ...] | None = None  # its float32 score columns (default: one, named after the metric)

    @property
    def score_columns(self) -> tuple[str, ...]:
        return (self.name,) if self.columns is None else self.columns


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    METRICS[metric.name] = metric
    return metric


def list_metrics() -> list[str]:
    return sorted(METRICS)


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; available: {', '.join(list_metrics())}")
    return METRICS[name]


class MetricRangeError(DataPruneError):
    exit_code = 7


def check_range(name: str, values: np.ndarray) -> None:
    """Reject values outside the metric's documented range (NaN = not scored, allowed)."""
    m = get_metric(name)
    v = values[~np.isnan(values)]
    if v.size and (v.min() < m.low - 1e-4 or v.max() > m.high + 1e-4):
        raise MetricRangeError(f"metric {name}: values in [{v.min():.4g}, {v.max():.4g}] fall outside its range [{m.low}, {m.high}]")


INF = math.inf
