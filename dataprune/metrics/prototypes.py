"""Prototype metrics (kind ``embed``), the paper's label-free metric and its supervised variant.

``prototypes`` (Sorscher et al. 2022): embed every image (L2-normalised rows), cluster with
spherical k-means, and score each sample by its **cosine distance to the nearest centroid**
(``1 - max_c <x, c>``, range [0, 2], higher = harder). ``class-prototypes`` scores a sample by its
cosine distance to the normalised mean embedding of its own class (two streaming passes: per-class
sums + counts, which add across shards and ranks, then the distances).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import Metric, register
from .embeddings import embed_params
from .kmeans import _MAX_BLOCK, _check_2d, _num_rows, load_rows, normalize_rows
from .kmeans_dist import FIXED


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError("labels must be 1-D")
    lab = labels.astype(np.int64)
    if lab.size and lab.max(initial=-1) >= num_classes:
        raise ValueError(f"label {int(lab.max())} is out of range for {num_classes} classes")
    return lab


def class_sums(x: Any, labels: np.ndarray, num_classes: int, *, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 of class prototypes: per-class float64 sums of unit rows and int64 counts.

    Rows with a negative label (unlabelled) are ignored. Sums are accumulated in fixed point
    (:data:`~dataprune.metrics.kmeans_dist.FIXED`), so they add exactly across shards/ranks in any
    order (float64 holds them exactly up to 2**23 rows a class); :func:`normalize_rows` of the total gives the prototypes.
    """
    import torch

    _check_2d(x)
    lab = _check_labels(labels, num_classes)
    n = _num_rows(x)
    if lab.shape[0] != n:
        raise ValueError(f"{lab.shape[0]} labels for {n} embeddings")
    b = block or _MAX_BLOCK
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.int64)  # fixed point: exact in any order and split
    for s in range(0, n, b):
        lb = lab[s : s + b]
        keep = lb >= 0
        if not keep.any():
            continue
        xb = load_rows(x, slice(s, min(n, s + b)), "cpu")[torch.from_numpy(keep)]
        sums.index_add_(0, torch.from_numpy(lb[keep]), torch.round(xb * FIXED).to(torch.int64))
    counts = np.bincount(lab[lab >= 0], minlength=num_classes).astype(np.int64)
    return sums.numpy().astype(np.float64) / FIXED, counts


def prototype_distance(
    x: Any,
    labels: np.ndarray,
    prototypes: np.ndarray,
    *,
    block: int | None = None,
    device: Any = "cpu",
) -> np.ndarray:
    """Pass 2: ``1 - <x_i, prototypes[labels_i]>`` per row (float32, [0, 2]); NaN where label < 0
    or the prototype is a zero row."""
    import torch

    _check_2d(x)
    protos = normalize_rows(prototypes)
    lab = _check_labels(labels, protos.shape[0])
    n = _num_rows(x)
    b = block or _MAX_BLOCK
    out = np.full(n, np.nan, dtype=np.float32)
    valid_proto = np.linalg.norm(protos, axis=1) > 0
    p = torch.from_numpy(protos).to(device)
    for s in range(0, n, b):
        lb = lab[s : s + b]
        keep = lb >= 0
        keep[keep] = valid_proto[lb[keep]]
        if not keep.any():
            continue
        rows = np.flatnonzero(keep) + s
        xb = load_rows(x, rows, device)
        sim = (xb * p[torch.from_numpy(lb[keep]).to(p.device)]).sum(dim=1)
        out[rows] = (1.0 - sim).clamp_(0.0, 2.0).cpu().numpy()
    return out


def class_prototype_distance(x: Any, labels: np.ndarray, num_classes: int, *, block: int | None = None,
                             device: Any = "cpu") -> np.ndarray:
    """Cosine distance of each row to the normalised mean embedding of its own class.

    Two streaming passes (:func:`class_sums`, then :func:`prototype_distance`). float32 in [0, 2],
    higher = harder; NaN for unlabelled rows (label < 0).
    """
    sums, _counts = class_sums(x, labels, num_classes, block=block)
    return prototype_distance(x, labels, sums, block=block, device=device)


def prototypes(es) -> dict[str, np.ndarray]:
    c = es.clusters()
    return {"prototypes": c.dist.astype(np.float32, copy=False), "cluster": c.cluster.astype(np.int32, copy=False)}


def class_prototypes(es) -> dict[str, np.ndarray]:
    if not es.labelled:
        raise ConfigError("class-prototypes needs labels; this dataset has none (use prototypes)")
    sums, _counts = class_sums(es.x, es.labels, es.num_classes)  # this rank's rows: summed over the job's ranks
    dist = prototype_distance(es.x, es.labels, es.all_reduce(sums, "class prototypes"), device=es.device)
    return {"class_prototypes": dist.astype(np.float32, copy=False)}


register(Metric(
    "prototypes", "embed", False, False, 0.0, 2.0,
    "cosine distance to the nearest spherical k-means centroid of the encoder embeddings "
    "(Sorscher et al. 2022, self-supervised prototype metric; no labels)",
    extra_columns=("cluster",), compute=prototypes, params=embed_params,
))
register(Metric(
    "class-prototypes", "embed", True, False, 0.0, 2.0,
    "cosine distance to the normalised mean embedding of the sample's own class (supervised prototypes)",
    columns=("class_prototypes",), compute=class_prototypes, params=embed_params,
))
