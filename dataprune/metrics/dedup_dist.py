"""The ``dedup`` metric, and its partitioned form for a job's ranks (one process is a job of one).

Every cluster has one **owner** rank, chosen by cluster size so the pairwise work (∝ size²) balances
(largest cluster first to the least loaded rank; ties → lower cluster id, lower rank). Each rank
sends the rows of its shards to their clusters' owners **through the filesystem** the embedding
cache already needs (``<spill>/rows-S-to-O.npy`` + ``meta-S-to-O.npy``, written atomically; the
rows an owner already holds are read from its own cache files), then every owner deduplicates its
clusters with :func:`~dataprune.metrics.dedup.semantic_duplicates` over those rows read from disk
tile by tile (a giant cluster is never in memory), and sends each row's result back to the rank that
writes its part (``back-O-to-S.npy``). An owner orders its rows by (cluster, row of the job's
matrix), whatever rank they came from, so its tiles — and therefore groups, keepers and
``dup_max_sim`` — are exactly those of one process.

Exact copies (equal bytes or pixel hashes) are grouped inside their k-means cluster (identical
embeddings share a cluster). Group ids are dense, numbered by the group's lowest row of the job's
matrix: the ranks exchange each group's lowest row (8 bytes per group).

**Memory per rank** (a budget, not N x D): one similarity tile (``4 * block**2`` bytes, 16 MiB at
the default block 2048, plus up to ``22 * block**2`` when a tile is all pairs), the rows of two
tiles, a chunk of 65,536 rows while it writes a spill file, 8 bytes per duplicate group of the job,
and per row it writes or owns its metadata and working arrays (cluster, score, ids, hashes, keeper
order, union-find, results): 300-400 bytes at the peak, measured with
``benchmarks/bench_embed_dist.py`` at 2,000,000 rows. The embeddings themselves stay on disk.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..ids import mix64
from ..tables import atomic_path
from .base import Metric, register
from .dedup import choose_keepers, dedup_columns, exact_groups, image_keep, semantic_duplicates, union_groups
from .embeddings import embed_params
from .rows import ConcatRows, NpyRows, PickedRows

META = np.dtype([("local", "<i8"), ("row", "<i8"), ("cluster", "<i8"), ("score", "<f4"), ("sid", "<u8"), ("bh", "<u8"),
                 ("ph", "<u8")])
BACK = np.dtype([("local", "<i8"), ("root", "<i8"), ("max_sim", "<f4"), ("dup", "?"), ("exact", "?")])
CHUNK = 65536


def owners_by_size(counts: np.ndarray, world: int) -> np.ndarray:
    """Owner rank of each cluster: greedy by descending size² onto the least loaded rank."""
    counts = np.asarray(counts, dtype=np.int64)
    owner = np.zeros(counts.shape[0], dtype=np.int64)
    load = np.zeros(int(world), dtype=np.float64)
    for c in np.lexsort((np.arange(counts.shape[0]), -counts)).tolist():
        r = int(np.argmin(load))  # ties → lower rank
        owner[c] = r
        load[r] += float(counts[c]) ** 2
    return owner


def _save(path: str, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def _save_rows(path: str, x: Any, rows: np.ndarray) -> None:
    """Rows ``x[rows]`` as an ``.npy`` written chunk by chunk (never all of them in memory)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(x.dtype)), "fortran_order": False,
                                                 "shape": (int(rows.size), int(x.shape[1]))})
        for i in range(0, rows.size, CHUNK):
            f.write(np.ascontiguousarray(x[rows[i : i + CHUNK]], dtype=x.dtype).tobytes())


def _within_cluster(h: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """Hash values that are equal only for equal hashes in the same cluster (0 stays "no hash")."""
    return np.where(h == 0, np.uint64(0), mix64(h ^ mix64(cluster.astype(np.uint64), 0x5EED), 1) | np.uint64(1))


def dedup_owned(x: Any, m: np.ndarray, cfg, device: Any, stats: dict) -> np.ndarray:
    """Dedup of an owner's rows ``x`` (ordered by cluster, then job row) with their ``META`` ``m``:
    returns a ``BACK`` record per row (``root`` = the lowest job row of its group, -1 for none)."""
    rule, keep = cfg.dedup_rule, image_keep(cfg)
    score, sid, cid = m["score"], m["sid"], m["cluster"]
    sem = semantic_duplicates(x, cid, cfg.dedup_eps, keep=keep, rule=rule, scores=score, sample_ids=sid, seed=cfg.seed,
                              device=device, stats=stats)
    exact = exact_groups([_within_cluster(m["bh"], cid), _within_cluster(m["ph"], cid)])
    groups = union_groups(exact, sem.dup_group)
    is_dup = choose_keepers(groups if rule == "components" else exact, keep, scores=score, sample_ids=sid, seed=cfg.seed)
    if rule != "components":
        is_dup |= sem.is_duplicate
    out = np.zeros(m.shape[0], BACK)
    out["local"] = m["local"]
    low = np.full(int(groups.max(initial=-1)) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    ing = groups >= 0
    np.minimum.at(low, groups[ing], m["row"][ing])
    out["root"] = np.where(ing, low[np.maximum(groups, 0)] if low.size else -1, -1)
    out["max_sim"] = np.where(exact >= 0, 1.0, sem.dup_max_sim)
    out["dup"] = is_dup
    out["exact"] = choose_keepers(exact, "first")
    return out


def partitioned(es) -> dict[str, np.ndarray]:
    """The dedup columns of this rank's rows, the clusters deduplicated by their owners (module docstring)."""
    cfg, c, comm = es.cfg, es.clusters(), es.comm
    rank, world = comm.rank, comm.world
    counts = comm.all_reduce(np.bincount(c.cluster, minlength=c.k).astype(np.int64), "dedup")
    owner = owners_by_size(counts, world)[c.cluster]
    n = int(es.x.shape[0])
    meta = np.zeros(n, META)
    meta["local"], meta["row"], meta["cluster"], meta["score"] = np.arange(n), es.rows, c.cluster, c.dist
    meta["sid"], (meta["bh"], meta["ph"]) = es.ids, es.hashes
    spill = es.spill
    written = []
    if world > 1:
        os.makedirs(spill, exist_ok=True)
    for o in range(world):
        if o != rank:
            rows = np.flatnonzero(owner == o)
            rows = rows[np.lexsort((meta["row"][rows], meta["cluster"][rows]))]
            base = os.path.join(spill, f"{rank}-to-{o}")
            _save_rows(base + ".rows.npy", es.x, rows)
            _save(base + ".meta.npy", meta[rows])
            written += [base + ".rows.npy", base + ".meta.npy"]
    comm.barrier("dedup (rows to the ranks that own their clusters)")
    mine = np.flatnonzero(owner == rank)
    sources, metas, src = [PickedRows(es.x, mine)], [meta[mine]], [np.full(mine.size, rank)]
    del meta, owner  # O(rows) copies are what a rank's memory grows with: one at a time
    for s in range(world):
        if s != rank:
            base = os.path.join(spill, f"{s}-to-{rank}")
            sources.append(NpyRows(base + ".rows.npy"))
            metas.append(np.load(base + ".meta.npy"))
            src.append(np.full(metas[-1].shape[0], s))
    m = np.concatenate(metas) if len(metas) > 1 else metas[0]
    del metas
    src = np.concatenate(src)
    perm = np.lexsort((m["row"], m["cluster"]))
    m, src = m[perm], src[perm]
    stats: dict = {}
    back = dedup_owned(PickedRows(ConcatRows(sources, dim=es.x.shape[1]), perm), m, cfg, es.device, stats)
    del m
    for s in range(world):
        if s != rank:
            path = os.path.join(spill, f"back-{rank}-to-{s}.npy")
            _save(path, back[src == s])
            written.append(path)
    comm.barrier("dedup (results to the ranks that write them)")
    res = [back[src == rank]] + [np.load(os.path.join(spill, f"back-{s}-to-{rank}.npy")) for s in range(world) if s != rank]
    mine_back = np.zeros(n, BACK)
    for r in res:
        mine_back[r["local"]] = r
    roots = np.unique(back["root"][back["root"] >= 0])
    roots = np.unique(np.concatenate(comm.all_gather(roots, "dedup (group ids)")))
    root = mine_back["root"]
    dup_group = np.where(root >= 0, np.searchsorted(roots, root), -1).astype(np.int64)
    tot = comm.all_reduce(np.array([mine_back["dup"].sum(), back["exact"].sum(), stats.get("tiles", 0)], np.int64), "dedup")
    comm.barrier("dedup (done)")
    for f in written:
        os.unlink(f)
    es.info.update(dedup_eps=cfg.dedup_eps, dedup_keep=image_keep(cfg), dedup_rule=cfg.dedup_rule, duplicates=int(tot[0]),
                   exact_duplicates=int(tot[1]), dedup_tiles=int(tot[2]))
    return {"dup_group": dup_group, "dup_max_sim": mine_back["max_sim"].astype(np.float32), "is_duplicate": mine_back["dup"]}


def dedup(es) -> dict[str, np.ndarray]:
    """Exact copies (bytes or decoded pixels hash equal) joined with SemDeDup's near-duplicates inside
    each k-means cluster: :func:`~dataprune.metrics.dedup.dedup_columns` over a set holding every row,
    :func:`partitioned` over a job's rank (``es.comm``)."""
    return dedup_columns(es) if es.comm is None else partitioned(es)


register(Metric(
    "dedup", "embed", False, False, -1.0, 1.0,
    "exact (bytes or pixels) and semantic (SemDeDup: cosine similarity ≥ 1 − eps inside a k-means cluster) "
    "duplicates; flags, not a difficulty score",
    columns=(), extra_columns=("dup_group", "dup_max_sim", "is_duplicate"), compute=dedup,
    direction="is_duplicate = True marks redundant rows",
    params=lambda cfg: {**embed_params(cfg), "eps": cfg.dedup_eps, "keep": image_keep(cfg), "rule": cfg.dedup_rule},
))
