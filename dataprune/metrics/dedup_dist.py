"""The ``dedup`` metric, and its partitioned form for a job's ranks (one process is a job of one).

Every cluster has one **owner** rank, chosen by cluster size so the pairwise work (∝ size²) balances
(largest cluster first to the least loaded rank; ties → lower cluster id, lower rank). Each rank
sends its rows to their clusters' owners **through the filesystem** the embedding cache already
needs: ``<spill>/S-to-O.meta.npy`` (every row's ``META``) and, for another owner,
``S-to-O.rows.npy`` (its embedding; an owner reads its own rows from its cache files). A file holds
the owner's clusters in ascending id, each cluster's rows in row order: a counting sort written chunk
by chunk at each cluster's place (the ranks all-gather their per-cluster counts, K integers each), so
a sender holds one chunk (:data:`CHUNK` rows), never a sorted copy of its rows.

An owner deduplicates its clusters **in batches** of whole clusters of at most
:data:`BATCH_ROWS` rows (a larger cluster is a batch of its own): it reads the batch's slice of every
sender's file, orders the rows by (cluster, row of the job's matrix), whatever rank they came from,
runs :func:`~dataprune.metrics.dedup.semantic_duplicates` over them read from disk tile by tile, and
writes each row's result (``BACK``) to the file of the rank that writes its part (``back-O-to-S.npy``),
which reads it back chunk by chunk after a barrier. Groups never cross a cluster, so batches change
nothing: tiles, groups, keepers and ``dup_max_sim`` are exactly those of one process.

Exact copies (equal bytes or pixel hashes) are grouped inside their k-means cluster (identical
embeddings share a cluster). Group ids are dense, numbered by the group's lowest row of the job's
matrix: the ranks exchange each group's lowest row (8 bytes per group).

**Memory per rank: a budget, not N.** The dedup working arrays (metadata, keeper order, union-find,
results: ~350 bytes a row, measured with ``benchmarks/bench_embed_dist.py``) are held for the rows of
one batch, :data:`BATCH_ROWS` (262,144 rows: ~90 MiB), or of the largest cluster when it is larger;
besides that one similarity tile (``4 * block**2`` bytes, 16 MiB at the default block 2048, plus up to
``22 * block**2`` when a tile is all pairs), the rows of two tiles, one :data:`CHUNK` of rows and
metadata while sending or receiving (~36 MiB at D = 256), and 8 bytes per duplicate group of the job.
What stays per row of the rank is its output columns (``dup_group`` int64, ``dup_max_sim`` float32,
``is_duplicate`` bool: 13 bytes) and the embedding set's cluster and distance (8 bytes); ids and
hashes are read chunk by chunk (:class:`~dataprune.metrics.rows.NpyColumn`), the embeddings stay on
disk. Each batch's freed memory is handed back to the system (:func:`~dataprune.metrics.rows.trim_heap`),
so the resident set does not grow with the number of batches. Spill files live in ``OUT/.embed-spill`` and are removed when the
step ends (a stopped run's are removed by the next run's rank 0).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from ..ids import mix64
from .base import Metric, register
from .dedup import choose_keepers, dedup_columns, exact_groups, image_keep, semantic_duplicates, union_groups
from .embeddings import embed_params
from .rows import ConcatRows, NpyColumn, NpyRows, PickedRows, trim_heap

META = np.dtype([("local", "<i8"), ("row", "<i8"), ("cluster", "<i8"), ("score", "<f4"), ("sid", "<u8"), ("bh", "<u8"),
                 ("ph", "<u8")])
BACK = np.dtype([("local", "<i8"), ("root", "<i8"), ("max_sim", "<f4"), ("dup", "?"), ("exact", "?")])
#: Rows a rank sends or reads back at a time.
CHUNK = 65536
#: Rows of whole clusters an owner deduplicates at once: the budget its per-row dedup working arrays
#: are held to (module docstring); a cluster larger than this is a batch of its own.
BATCH_ROWS = 1 << 18


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


def _place(counts: np.ndarray, owner: np.ndarray, o: int) -> np.ndarray:
    """First position of each of owner ``o``'s clusters (ascending id) in a file of ``counts`` rows per cluster."""
    own = np.flatnonzero(owner == o)
    return np.concatenate([[0], np.cumsum(counts[own])]).astype(np.int64)


class _Spill:
    """An ``.npy`` of ``shape`` written at any place (``pwrite``) under a temporary name in its
    directory; :meth:`close` renames it into place (or removes it)."""

    def __init__(self, path: str, dtype: Any, shape: tuple):
        fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=os.path.basename(path) + ".")
        self.path, self.f = path, os.fdopen(fd, "wb")
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": tuple(int(v) for v in shape)})
        self.f.flush()
        self.head, self.item = self.f.tell(), np.dtype(dtype).itemsize * int(np.prod(shape[1:], dtype=np.int64))
        self.f.truncate(self.head + self.item * int(shape[0]))

    def put(self, at: int, arr: np.ndarray) -> None:
        if arr.shape[0]:
            os.pwrite(self.f.fileno(), np.ascontiguousarray(arr).tobytes(), self.head + self.item * int(at))

    def close(self, ok: bool = True) -> None:
        self.f.close()
        if ok:
            os.replace(self.tmp, self.path)
        elif os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _close(files, ok: bool) -> None:
    for f in files:
        if f is not None:
            f.close(ok)


def _send(es, c, owner: np.ndarray, counts: np.ndarray) -> None:
    """This rank's rows (``counts`` per cluster) into their owners' files (module docstring)."""
    rank, world, spill = es.comm.rank, es.comm.world, es.spill
    n, at = int(es.x.shape[0]), np.zeros(c.k, np.int64)
    for o in range(world):  # each cluster's place in its owner's file
        own = np.flatnonzero(owner == o)
        at[own] = _place(counts, owner, o)[:-1]
    files: dict = {}
    try:
        for o in range(world):
            tot = int(counts[owner == o].sum())
            base = os.path.join(spill, f"{rank}-to-{o}")
            files[o] = (_Spill(base + ".meta.npy", META, (tot,)),
                        _Spill(base + ".rows.npy", es.x.dtype, (tot, int(es.x.shape[1]))) if o != rank else None)
        bh, ph = es.hashes
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            o_ = np.argsort(c.cluster[a:b], kind="stable")  # by cluster, row order inside
            m = np.zeros(b - a, META)
            m["local"], m["row"], m["cluster"], m["score"] = np.arange(a, b), es.rows[a:b], c.cluster[a:b], c.dist[a:b]
            m["sid"], m["bh"], m["ph"] = es.ids[a:b], bh[a:b], ph[a:b]
            m = m[o_]
            xs = None
            cut = np.flatnonzero(np.r_[True, m["cluster"][1:] != m["cluster"][:-1], True])
            for lo, hi in zip(cut[:-1].tolist(), cut[1:].tolist()):
                k = int(m["cluster"][lo])
                o, pos = int(owner[k]), int(at[k])
                at[k] += hi - lo
                files[o][0].put(pos, m[lo:hi])
                if o != rank:
                    xs = np.asarray(es.x[a:b])[o_] if xs is None else xs
                    files[o][1].put(pos, xs[lo:hi])
            del m, xs
    except BaseException:
        _close([f for fs in files.values() for f in fs], ok=False)
        raise
    _close([f for fs in files.values() for f in fs], ok=True)


def batches(sizes: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """Runs ``[j0, j1)`` of consecutive clusters of at most ``budget`` rows (a larger cluster alone)."""
    out, j0, tot = [], 0, 0
    for j, s in enumerate(np.asarray(sizes).tolist()):
        if j > j0 and tot + s > budget:
            out.append((j0, j))
            j0, tot = j, 0
        tot += s
    if sizes.shape[0] > j0:
        out.append((j0, int(sizes.shape[0])))
    return out


def _own(es, owner: np.ndarray, counts_by: np.ndarray, res: dict) -> dict:
    """Dedup of this rank's clusters batch by batch; results for its own rows into ``res``, the
    others' into their back files. Returns the totals and the batches' group roots."""
    cfg, rank, world, spill = es.cfg, es.comm.rank, es.comm.world, es.spill
    own = np.flatnonzero(owner == rank)
    place = [_place(counts_by[s], owner, rank) for s in range(world)]
    backs = {s: _Spill(os.path.join(spill, f"back-{rank}-to-{s}.npy"), BACK, (int(place[s][-1]),))
             for s in range(world) if s != rank}
    tot = {"exact": 0, "tiles": 0, "batches": 0, "roots": []}
    try:
        for j0, j1 in batches(counts_by[:, own].sum(axis=0), BATCH_ROWS):
            metas, parts = [], []
            for s in range(world):
                lo, hi = int(place[s][j0]), int(place[s][j1])
                metas.append(NpyColumn(os.path.join(spill, f"{s}-to-{rank}.meta.npy"))[lo:hi])
                rows = NpyRows(os.path.join(spill, f"{s}-to-{rank}.rows.npy")) if s != rank else es.x
                parts.append(PickedRows(rows, metas[-1]["local"] if s == rank else np.arange(lo, hi)))
            src = np.concatenate([np.full(m.shape[0], s, np.int32) for s, m in enumerate(metas)])
            m = np.concatenate(metas)
            del metas
            if not m.shape[0]:
                continue
            perm = np.lexsort((m["row"], m["cluster"]))
            stats: dict = {}
            back = dedup_owned(PickedRows(ConcatRows(parts, dim=es.x.shape[1]), perm), m[perm], cfg, es.device, stats)
            src = src[perm]
            del m, perm
            tot["exact"] += int(back["exact"].sum())
            tot["tiles"] += int(stats.get("tiles", 0))
            tot["batches"] += 1
            tot["roots"].append(np.unique(back["root"][back["root"] >= 0]))
            for s in range(world):
                r = back[src == s]
                if s == rank:
                    _scatter(res, r)
                else:  # the batch's rows of sender s, at their place in its file (any order: scattered by "local")
                    backs[s].put(int(place[s][j0]), r)
            del back, src
            trim_heap()  # else the freed batch stays in glibc's heap, and the next one adds to it
    except BaseException:
        _close(backs.values(), ok=False)
        raise
    _close(backs.values(), ok=True)
    return tot


def _scatter(res: dict, r: np.ndarray) -> None:
    res["root"][r["local"]] = r["root"]
    res["max_sim"][r["local"]] = r["max_sim"]
    res["dup"][r["local"]] = r["dup"]


def partitioned(es) -> dict[str, np.ndarray]:
    """The dedup columns of this rank's rows, the clusters deduplicated by their owners (module docstring)."""
    cfg, c, comm = es.cfg, es.clusters(), es.comm
    rank, world, spill = comm.rank, comm.world, es.spill
    n = int(es.x.shape[0])
    counts_by = np.stack(comm.all_gather(np.bincount(c.cluster, minlength=c.k).astype(np.int64), "dedup"))
    owner = owners_by_size(counts_by.sum(axis=0), world)
    os.makedirs(spill, exist_ok=True)
    _send(es, c, owner, counts_by[rank])
    trim_heap()
    comm.barrier("dedup (rows to the ranks that own their clusters)")
    res = {"root": np.full(n, -1, np.int64), "max_sim": np.full(n, np.nan, np.float32), "dup": np.zeros(n, bool)}
    tot = _own(es, owner, counts_by, res)
    comm.barrier("dedup (results to the ranks that write them)")
    for s in range(world):
        if s != rank:
            back = NpyColumn(os.path.join(spill, f"back-{s}-to-{rank}.npy"))
            size = int(counts_by[rank][owner == s].sum())
            for a in range(0, size, CHUNK):
                _scatter(res, back[a : min(size, a + CHUNK)])
    roots = np.unique(np.concatenate(tot["roots"])) if tot["roots"] else np.zeros(0, np.int64)
    roots = np.unique(np.concatenate(comm.all_gather(roots, "dedup (group ids)")))
    root = res["root"]
    for a in range(0, n, CHUNK):  # the group's lowest row → its dense id, in place
        r = root[a : a + CHUNK]
        root[a : a + CHUNK] = np.where(r >= 0, np.searchsorted(roots, r), -1)
    del roots
    sums = comm.all_reduce(np.array([res["dup"].sum(), tot["exact"], tot["tiles"], tot["batches"]], np.int64), "dedup")
    comm.barrier("dedup (done)")
    for f in os.listdir(spill):
        if f.startswith(f"{rank}-to-") or f.startswith(f"back-{rank}-to-"):
            os.unlink(os.path.join(spill, f))
    es.info.update(dedup_eps=cfg.dedup_eps, dedup_keep=image_keep(cfg), dedup_rule=cfg.dedup_rule, duplicates=int(sums[0]),
                   exact_duplicates=int(sums[1]), dedup_tiles=int(sums[2]), dedup_batches=int(sums[3]))
    return {"dup_group": root, "dup_max_sim": res["max_sim"], "is_duplicate": res["dup"]}


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
