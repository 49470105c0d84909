"""Registry entries for the metrics computed from encoder embeddings (see ``dataprune/embedding.py``;
the numerical core is in ``prototypes.py`` and ``dedup.py``)."""

from __future__ import annotations

from .base import Metric, register

register(Metric(
    "prototypes", "embed", False, False, 0.0, 2.0,
    "cosine distance to the nearest spherical k-means centroid of the encoder embeddings "
    "(Sorscher et al. 2022, self-supervised prototype metric; no labels)",
    extra_columns=("cluster",),
))
register(Metric(
    "class-prototypes", "embed", True, False, 0.0, 2.0,
    "cosine distance to the normalised mean embedding of the sample's own class (supervised prototypes)",
    columns=("class_prototypes",),
))
register(Metric(
    "dedup", "embed", False, False, -1.0, 1.0,
    "exact (bytes or pixels) and semantic (SemDeDup: cosine similarity ≥ 1 − eps inside a k-means cluster) "
    "duplicates; flags, not a difficulty score",
    columns=(), extra_columns=("dup_group", "dup_max_sim", "is_duplicate"),
))
