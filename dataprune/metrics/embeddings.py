"""What the ``embed`` metrics compute from: every embedded row at once, and one k-means fit that
the prototype and dedup metrics share (fitted on first use)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .kmeans import assign, spherical_kmeans


def default_clusters(n: int, num_classes: int | None, labelled: bool) -> int:
    """k: the number of classes when labels exist, else round(sqrt(n / 2)) clamped to [2, 10000]."""
    if labelled and num_classes:
        return int(num_classes)
    return int(min(10_000, max(2, round(math.sqrt(n / 2)))))


def fit_clusters(asked: int | None, n: int, sample: int | None, default: int, info: dict) -> int:
    """k for the fit on ``min(n, sample)`` rows: ``--clusters`` above that is an error (as ``--count``
    above the candidates is for `select`: the data cannot give what was asked); the default k
    (classes, or sqrt(n/2)) is lowered to it, with a note in ``info``."""
    from ..errors import ConfigError

    rows = n if sample is None else min(n, sample)
    if asked is not None:
        if asked > rows:
            raise ConfigError(f"--clusters {asked} is more than the {rows} rows k-means is fitted on ({n} embedded"
                              + (f", --kmeans-sample {sample}" if sample is not None and sample < n else "") + "); lower --clusters")
        return asked
    if default > rows:
        info.setdefault("notes", []).append(f"k-means: the default {default} clusters lowered to the {rows} rows it is fitted on")
    return min(default, rows)


@dataclass
class Clusters:
    k: int
    centroids: np.ndarray  # (k, D) unit rows
    cluster: np.ndarray  # int32 per row
    dist: np.ndarray  # float32 cosine distance to the nearest centroid, per row


@dataclass
class EmbeddingSet:
    """``x``: (N, D) float16 embeddings (a memmap); per row ``labels`` (-1 = none), ``ids``
    (sample ids) and ``hashes`` (bytes and pixel blake2b-64); ``cfg``: the run's ScoreConfig.
    ``info`` collects what the metrics report (clusters, duplicates, ...)."""

    x: Any
    labels: np.ndarray
    ids: np.ndarray
    hashes: tuple[np.ndarray, np.ndarray]
    num_classes: int
    cfg: Any
    device: Any = "cpu"
    emit: Callable[[str, dict], None] = lambda kind, info: None
    info: dict = field(default_factory=dict)
    #: A job's rank (``kmeans_dist.Comm``): ``x`` and the per-row arrays are then this rank's rows
    #: only, ``segments`` its shards as row ranges, ``rows`` each row's position in the job's matrix
    #: (shards in order), ``spill`` the directory the ranks exchange rows through (dedup).
    comm: Any = None
    segments: list | None = None
    rows: np.ndarray | None = None
    spill: str | None = None
    _clusters: Clusters | None = None
    _labelled: bool | None = None

    @property
    def labelled(self) -> bool:
        if self._labelled is None:
            mine = int((self.labels >= 0).any())
            self._labelled = bool(mine if self.comm is None else self.comm.all_reduce(np.array([mine], np.int64), "labels")[0])
        return self._labelled

    def all_reduce(self, a: np.ndarray, step: str) -> np.ndarray:
        """Sum of ``a`` over the job's ranks (``a`` itself in one process)."""
        return a if self.comm is None else self.comm.all_reduce(a, step)

    def clusters(self) -> Clusters:
        """Spherical k-means (k = --clusters, else ``default_clusters``) fitted on a seeded sample,
        then every row assigned block by block; computed once per run."""
        if self._clusters is None and self.comm is not None:
            self._clusters = self._clusters_of_job()
        if self._clusters is None:
            cfg, n, t0 = self.cfg, self.x.shape[0], time.perf_counter()
            k = fit_clusters(cfg.clusters, n, cfg.kmeans_sample, default_clusters(n, self.num_classes, self.labelled), self.info)
            fit = n if cfg.kmeans_sample is None else min(n, cfg.kmeans_sample)
            self.emit("kmeans_start", {"clusters": int(k), "rows": int(n), "fit_rows": int(fit), "iters": int(cfg.kmeans_iters)})

            def step(stage: str, done: int, total: int) -> None:
                self.emit("kmeans_step", {"stage": stage, "done": int(done), "total": int(total)})

            centroids = spherical_kmeans(self.x, k, iters=cfg.kmeans_iters, seed=cfg.seed, sample=cfg.kmeans_sample,
                                         backend=cfg.kmeans_backend, device=self.device, progress=step)
            step("fit", cfg.kmeans_iters, cfg.kmeans_iters)  # faiss fits in one call
            cluster, dist = assign(self.x, centroids, device=self.device)
            step("assign", n, n)
            self._clusters = Clusters(int(k), centroids, cluster, dist)
            self.info.update(clusters=int(k), kmeans_backend=cfg.kmeans_backend, kmeans_iters=cfg.kmeans_iters,
                             kmeans_sample=cfg.kmeans_sample)
            self.emit("kmeans", {"clusters": int(k), "rows": int(n), "seconds": time.perf_counter() - t0})
        return self._clusters

    def _clusters_of_job(self) -> Clusters:
        """The job's k-means (:mod:`~dataprune.metrics.kmeans_dist`): the sample chosen by hash of
        ``sample_id``, sums all-reduced; then this rank's rows assigned."""
        from .kmeans import kmeans_backend
        from .kmeans_dist import assign_segments, fit, total_rows

        cfg, t0 = self.cfg, time.perf_counter()
        n = total_rows(int(self.x.shape[0]), self.comm)
        k = fit_clusters(cfg.clusters, n, cfg.kmeans_sample, default_clusters(n, self.num_classes, self.labelled), self.info)
        backend = kmeans_backend(cfg.kmeans_backend) if str(self.device) == "cpu" else "torch"
        segs = self.segments if self.segments is not None else [(0, int(self.x.shape[0]))]
        self.emit("kmeans_start", {"clusters": int(k), "rows": int(n), "fit_rows": int(min(n, cfg.kmeans_sample or n)),
                                   "iters": int(cfg.kmeans_iters)})

        def step(stage: str, done: int, total: int) -> None:
            self.emit("kmeans_step", {"stage": stage, "done": int(done), "total": int(total)})

        centroids, _fitted = fit(self.x, segs, self.ids, k, self.comm, iters=cfg.kmeans_iters, seed=cfg.seed,
                                 sample=cfg.kmeans_sample, device=self.device, backend=backend, progress=step)
        cluster, dist = assign_segments(self.x, segs, centroids, device=self.device, backend=backend)
        step("assign", n, n)
        self.info.update(clusters=int(k), kmeans_backend=backend, kmeans_iters=cfg.kmeans_iters, kmeans_sample=cfg.kmeans_sample)
        self.emit("kmeans", {"clusters": int(k), "rows": int(n), "seconds": time.perf_counter() - t0})
        return Clusters(int(k), centroids, cluster, dist)


def embed_params(cfg) -> dict:
    """The options every embedding metric's values depend on (recorded in the table's metadata)."""
    return {"clusters": cfg.clusters, "kmeans_iters": cfg.kmeans_iters, "kmeans_sample": cfg.kmeans_sample}
