"""Difficulty metrics. Importing this package registers every built-in metric."""

from . import dynamics  # noqa: F401  (registers el2n, grand, forgetting, aum, loss, margin, entropy)
from . import embedded  # noqa: F401  (registers prototypes, class-prototypes, dedup)
from .base import METRICS, Metric, check_range, get_metric, list_metrics, register

__all__ = ["METRICS", "Metric", "check_range", "get_metric", "list_metrics", "register"]
