"""Difficulty metrics. Importing this package registers every built-in metric (registration order
fixes the order of the embedding columns in a part)."""

from . import outputs, grand, dynamics, prototypes, dedup_dist, textdedup, textsubstr  # noqa: F401, I001  (each module registers its metrics)
from .base import KINDS, METRICS, Metric, check_range, get_metric, in_registry_order, list_metrics, register, unregister

__all__ = ["KINDS", "METRICS", "Metric", "check_range", "get_metric", "in_registry_order", "list_metrics", "register", "unregister"]
