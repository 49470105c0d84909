"""The global embed metrics of a job, every rank over the rows of its own shards.

Under torchrun each rank reads only the cached embeddings of ``rank_shards(shards, rank, world)``,
streamed from the cache files block by block (:mod:`dataprune.metrics.rows`); k-means runs across
the ranks (:mod:`dataprune.metrics.kmeans_dist`), every rank assigns its own rows, and dedup moves
rows to their cluster's owner through ``OUT/.embed-spill/`` (:mod:`dataprune.metrics.dedup_dist`).
One process runs the same code as a job of one, so a table is the same whatever the world size.
No rank ever holds the N x D matrix, and the working memory of each step is a budget, not N (the
module docstrings of ``kmeans_dist`` and ``dedup_dist``); per row of the rank it holds its labels
(8 bytes) and the columns it returns. Sample ids and hashes are written to ``OUT/.embed-spill``
shard by shard and read back chunk by chunk; job rows are computed, not stored.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pyarrow.parquet as pq

from ..distributed import rank_shards
from ..errors import ConfigError

SPILL = ".embed-spill"
_BASE = ("emb_row", "label", "sample_id", "bytes_hash", "pixel_hash")


def _emb(cache: str, sidx: int) -> str:
    return os.path.join(cache, f"emb-{sidx:06d}.npy")


def _base_columns(cache: str, shards: list, n: int, spill: str, rank: int) -> dict:
    """The embedded rows' labels (-1 = none; in memory), and sample ids and hashes (written to
    ``spill``, read back chunk by chunk: :class:`~dataprune.metrics.rows.NpyColumn`), for ``shards``
    in order (``n`` rows in all), shard by shard: no table of every shard is held at once."""
    from ..metrics.rows import NpyColumn

    labels = np.empty(n, np.int64)
    lazy = ("sample_id", "bytes_hash", "pixel_hash")
    paths = {c: os.path.join(spill, f"rank{rank}.{c}.npy") for c in lazy}
    files = {c: open(p, "wb") for c, p in paths.items()}
    try:
        for f in files.values():
            np.lib.format.write_array_header_1_0(f, {"descr": "<u8", "fortran_order": False, "shape": (n,)})
        at = 0
        for s in shards:
            t = pq.read_table(os.path.join(cache, f"base-{s.index:06d}.parquet"), columns=list(_BASE))
            have = t.column("emb_row").to_numpy() >= 0
            k = int(have.sum())
            if at + k > n:
                raise ConfigError(f"embedding cache {cache}: more embedded rows listed than the {n} embeddings; remove the cache")
            lab = t.column("label").to_numpy(zero_copy_only=False)
            labels[at : at + k] = np.where(np.isnan(lab.astype(np.float64)), -1, lab).astype(np.int64)[have]
            for c in lazy:
                files[c].write(np.ascontiguousarray(t.column(c).to_numpy()[have], dtype="<u8").tobytes())
            at += k
            del t
    finally:
        for f in files.values():
            f.close()
    if at != n:
        raise ConfigError(f"embedding cache {cache}: {at} embedded rows listed for {n} embeddings; remove the cache")
    return {"label": labels, **{c: NpyColumn(p) for c, p in paths.items()}}


def job_metrics(p, cache: str, device, emit, rank: int = 0, world: int = 1):
    """Every embed metric of the run over this rank's rows, computed with the job's other ranks.
    Returns ``(offsets, columns, info)``: each of this rank's shards' first row in ``columns``."""
    from ..metrics import in_registry_order
    from ..metrics.embeddings import EmbeddingSet
    from ..metrics.kmeans_dist import Comm
    from ..metrics.rows import ConcatRows, JobRows, NpyRows

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
    offsets, segments, n = {}, [], 0
    for s, pt in zip(mine, parts):
        offsets[s.index] = n
        segments.append((n, n + pt.shape[0]))
        n += pt.shape[0]
    rows = JobRows(segments, [first[s.index] for s in mine])
    x = ConcatRows(parts, dim=dims.pop())
    os.makedirs(spill, exist_ok=True)  # after a collective: rank 0 has removed a stopped run's
    try:
        b = _base_columns(cache, mine, n, spill, rank)
        es = EmbeddingSet(x, b["label"], b["sample_id"], (b["bytes_hash"], b["pixel_hash"]), p.num_classes, p.cfg, device, emit,
                          info={"rows": int(at), "dim": int(x.shape[1]), "cache": cache, "world": int(world)}, comm=comm,
                          segments=segments, rows=rows, spill=spill)
        t0 = time.perf_counter()
        out: dict[str, np.ndarray] = {}
        for m in in_registry_order(m for m in p.metrics if m.kind == "embed"):
            out.update(m.compute(es))
        comm.barrier("the embedding metrics (done)")
        if rank == 0 and os.path.isdir(spill):
            shutil.rmtree(spill, ignore_errors=True)
    except BaseException:
        if world == 1:  # a job of one: nothing resumes from the files and no other rank reads them
            shutil.rmtree(spill, ignore_errors=True)
        raise
    es.info["seconds"] = round(time.perf_counter() - t0, 3)
    emit("embed_done", es.info)
    return offsets, out, es.info
