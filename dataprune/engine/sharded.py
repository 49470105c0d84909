"""The global embed metrics of a job, every rank over the rows of its own shards.

Under torchrun each rank reads only the cached embeddings of ``rank_shards(shards, rank, world)``,
streamed from the cache files block by block (:mod:`dataprune.metrics.rows`); k-means runs across
the ranks (:mod:`dataprune.metrics.kmeans_dist`), every rank assigns its own rows, and dedup moves
rows to their cluster's owner through ``OUT/.embed-spill/`` (:mod:`dataprune.metrics.dedup_dist`).
One process runs the same code as a job of one, so a table is the same whatever the world size.
No rank ever holds the N x D matrix.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..distributed import rank_shards
from ..errors import ConfigError

SPILL = ".embed-spill"
_BASE = ("emb_row", "label", "sample_id", "bytes_hash", "pixel_hash")


def _emb(cache: str, sidx: int) -> str:
    return os.path.join(cache, f"emb-{sidx:06d}.npy")


def _base_columns(cache: str, shards: list) -> dict[str, np.ndarray]:
    """The embedded rows' labels (-1 = none), sample ids and hashes, for ``shards`` in order."""
    if not shards:
        return {"label": np.zeros(0, np.int64), "sample_id": np.zeros(0, np.uint64), "bytes_hash": np.zeros(0, np.uint64),
                "pixel_hash": np.zeros(0, np.uint64)}
    t = pa.concat_tables([pq.read_table(os.path.join(cache, f"base-{s.index:06d}.parquet"), columns=list(_BASE)) for s in shards])
    have = t.column("emb_row").to_numpy() >= 0
    labels = t.column("label").to_numpy(zero_copy_only=False)
    labels = np.where(np.isnan(labels.astype(np.float64)), -1, labels).astype(np.int64)[have]
    return {"label": labels, "sample_id": t.column("sample_id").to_numpy()[have],
            "bytes_hash": t.column("bytes_hash").to_numpy()[have], "pixel_hash": t.column("pixel_hash").to_numpy()[have]}


def job_metrics(p, cache: str, device, emit, rank: int = 0, world: int = 1):
    """Every embed metric of the run over this rank's rows, computed with the job's other ranks.
    Returns ``(offsets, columns, info)``: each of this rank's shards' first row in ``columns``."""
    from ..metrics import in_registry_order
    from ..metrics.embeddings import EmbeddingSet
    from ..metrics.kmeans_dist import Comm
    from ..metrics.rows import ConcatRows, NpyRows

    spill = os.path.join(p.cfg.out, SPILL)
    if rank == 0 and os.path.isdir(spill):
        shutil.rmtree(spill)  # left by a stopped run; the job holds OUT's lock, and no rank writes before a collective
    comm = Comm.from_job(rank, world)
    mine = rank_shards(p.shards, rank, world)
    parts = [NpyRows(_emb(cache, s.index)) for s in mine]
    sizes: dict[int, int] = {}
    dims = set()
    for d, dim in comm.all_gather(({s.index: pt.shape[0] for s, pt in zip(mine, parts)},
                                   {pt.shape[1] for pt in parts if pt.shape[0]}), "embedding rows"):
        sizes.update(d)
        dims |= dim
    if not dims:
        raise ConfigError("no sample could be embedded (every sample was skipped, or its embedding was not finite)")
    if len(dims) > 1:
        raise ConfigError(f"embedding cache {cache}: shards of different widths {sorted(dims)}; remove the cache")
    first, at = {}, 0
    for s in p.shards:  # the job's matrix: shards in order
        first[s.index], at = at, at + sizes[s.index]
    offsets, segments, rows, n = {}, [], [], 0
    for s, pt in zip(mine, parts):
        offsets[s.index] = n
        segments.append((n, n + pt.shape[0]))
        rows.append(np.arange(first[s.index], first[s.index] + pt.shape[0], dtype=np.int64))
        n += pt.shape[0]
    x = ConcatRows(parts, dim=dims.pop())
    b = _base_columns(cache, mine)
    if b["sample_id"].shape[0] != n:
        raise ConfigError(f"embedding cache {cache}: {b['sample_id'].shape[0]} embedded rows listed for {n} embeddings; "
                          "remove the cache")
    es = EmbeddingSet(x, b["label"], b["sample_id"], (b["bytes_hash"], b["pixel_hash"]), p.num_classes, p.cfg, device, emit,
                      info={"rows": int(at), "dim": int(x.shape[1]), "cache": cache, "world": int(world)}, comm=comm,
                      segments=segments, rows=np.concatenate(rows) if rows else np.zeros(0, np.int64), spill=spill)
    t0 = time.perf_counter()
    out: dict[str, np.ndarray] = {}
    for m in in_registry_order(m for m in p.metrics if m.kind == "embed"):
        out.update(m.compute(es))
    comm.barrier("the embedding metrics (done)")
    if rank == 0 and os.path.isdir(spill):
        shutil.rmtree(spill, ignore_errors=True)
    es.info["seconds"] = round(time.perf_counter() - t0, 3)
    emit("embed_done", es.info)
    return offsets, out, es.info
