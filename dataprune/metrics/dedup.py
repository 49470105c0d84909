"""Duplicate detection: exact (hash equality) and semantic (SemDeDup-style near duplicates).

Output columns (one value per sample, aligned with the input rows):

- ``dup_group`` int64: id of the duplicate group the sample belongs to, ``-1`` when it has no
  duplicate. Ids are dense (0, 1, ...) and numbered by the group's lowest row index; they are labels
  only, meaningful within one result.
- ``dup_max_sim`` float32 (semantic only): max cosine similarity to any *other* sample of the same
  k-means cluster, in [-1, 1]; NaN for a sample alone in its cluster or without a cluster (id < 0).
- ``is_duplicate`` bool: True for every member of a group except its one keeper.

Keeper order (``keep``: hard, easy, random; "first" for exact groups) and the semantic rules
(``rule``: greedy, semdedup, components) are described in :mod:`dataprune.metrics.keepers`. With
``greedy``/``semdedup`` a group is one kept row plus the removed rows attached to it (greedy: to its
most similar earlier kept row; semdedup: to the group of its most similar earlier row). With
``components`` groups are the connected components of the similar pairs (a vectorised union-find over
index arrays). Pairwise work is done per cluster in ``block x block`` tiles, so memory is bounded by
one tile (plus O(cluster) vectors) however large a cluster is; an N x N (or cluster x cluster) matrix
is never built.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..errors import ConfigError
from .keepers import KEEP_POLICIES, attached_roots, check_keep, check_rule, choose_keepers, keeper_order, ordered_pass
from .kmeans import _check_2d, load_rows
from .prototypes import prototype_distance

__all__ = ["KEEP_POLICIES", "bytes_hash", "choose_keepers", "exact_groups", "pixel_hash", "semantic_duplicates",
           "union_groups", "dedup_columns"]
#: Rows per side of one similarity tile: 2048 x 2048 float32 = 16 MiB.
DEFAULT_BLOCK = 2048


# ----------------------------------------------------------------------------------------------
# hashes


def _digest64(h: "hashlib._Hash") -> int:
    v = int.from_bytes(h.digest(), "little")
    return v or 1  # 0 is reserved for "no hash" (see exact_groups)


def bytes_hash(b: bytes | bytearray | memoryview) -> int:
    """uint64 BLAKE2b digest of encoded image bytes (never 0)."""
    h = hashlib.blake2b(digest_size=8, person=b"dataprune-bytes")
    h.update(b)
    return _digest64(h)


def pixel_hash(rgb: np.ndarray) -> int:
    """uint64 BLAKE2b digest of decoded pixels: shape plus raw uint8 values (never 0).

    Identical pixels give the same hash whatever the file format or encoder; any change to one
    pixel (re-encoding with another JPEG quality, say) gives another, so near copies are left to
    :func:`semantic_duplicates`.
    """
    a = np.ascontiguousarray(rgb)
    if a.dtype != np.uint8:
        raise ValueError(f"pixel_hash expects a uint8 array, got {a.dtype}")
    h = hashlib.blake2b(digest_size=8, person=b"dataprune-pixel")
    h.update(np.asarray(a.shape, dtype="<i8").tobytes())
    h.update(memoryview(a).cast("B"))
    return _digest64(h)


# ----------------------------------------------------------------------------------------------
# union-find over index arrays (vectorised; parent[i] <= i always, so a root is its component's minimum)


def _find(parent: np.ndarray, a: np.ndarray) -> np.ndarray:
    r = parent[a]
    while True:
        rr = parent[r]
        if np.array_equal(rr, r):
            break
        r = rr
    parent[a] = r  # compress the queried nodes
    return r


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the components of every pair ``(a[i], b[i])`` (hook the larger root under the smaller)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while a.size:
        ra, rb = _find(parent, a), _find(parent, b)
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        m = lo != hi
        if not m.any():
            return
        np.minimum.at(parent, hi[m], lo[m])
        a, b = a[m], b[m]


def _roots(parent: np.ndarray) -> np.ndarray:
    r = parent.copy()
    while True:
        rr = r[r]
        if np.array_equal(rr, r):
            return r
        r = rr


def _group_ids(roots: np.ndarray) -> np.ndarray:
    """Dense group ids (by lowest member row) for components of size >= 2; -1 for singletons."""
    n = roots.shape[0]
    size = np.bincount(roots, minlength=n)
    big = size >= 2
    gid = np.cumsum(big) - 1
    return np.where(big[roots], gid[roots], -1).astype(np.int64)


def _equal_pairs(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of consecutive rows with equal values (enough to connect each equal-value set)."""
    o = np.argsort(values, kind="stable")
    sv, sr = values[o], rows[o]
    same = sv[1:] == sv[:-1]
    return sr[:-1][same], sr[1:][same]


# ----------------------------------------------------------------------------------------------
# groups and keepers


def exact_groups(hashes: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """``dup_group`` (int64, -1 = unique) for rows with identical hashes.

    ``hashes``: a uint64 array ``(N,)``, or several hash columns as ``(N, H)`` or a sequence of
    ``(N,)`` arrays (e.g. bytes and pixel hashes): rows equal in *any* column share a group
    (transitively). The value 0 means "no hash" (say, pixels of an undecodable image) and never
    matches. Choose keepers with :func:`choose_keepers`.
    """
    if isinstance(hashes, (list, tuple)):
        cols = [np.asarray(h, dtype=np.uint64) for h in hashes]
    else:
        h = np.asarray(hashes, dtype=np.uint64)
        cols = [h] if h.ndim == 1 else [h[:, j] for j in range(h.shape[1])]
    n = cols[0].shape[0]
    if any(c.shape != (n,) for c in cols):
        raise ValueError("every hash column must be 1-D with the same length")
    parent = np.arange(n, dtype=np.int64)
    for c in cols:
        rows = np.flatnonzero(c != 0)
        a, b = _equal_pairs(c[rows], rows)
        _union(parent, a, b)
    return _group_ids(_roots(parent))


def union_groups(*groups: np.ndarray) -> np.ndarray:
    """Merge several ``dup_group`` arrays (say exact and semantic): rows sharing a group in any of
    them end up in one group (transitively). Returns a new dense ``dup_group``."""
    if not groups:
        raise ValueError("union_groups needs at least one group array")
    n = np.asarray(groups[0]).shape[0]
    parent = np.arange(n, dtype=np.int64)
    for g in groups:
        g = np.asarray(g, dtype=np.int64)
        if g.shape != (n,):
            raise ValueError("every group array must be 1-D with the same length")
        rows = np.flatnonzero(g >= 0)
        a, b = _equal_pairs(g[rows], rows)
        _union(parent, a, b)
    return _group_ids(_roots(parent))


# ----------------------------------------------------------------------------------------------
# semantic duplicates


class SemanticDuplicates(NamedTuple):
    dup_group: np.ndarray  # int64, -1 = not a duplicate
    dup_max_sim: np.ndarray  # float32, max cosine similarity to another sample of the cluster
    is_duplicate: np.ndarray  # bool, True for all but one keeper per group


def semantic_duplicates(
    x: Any,
    cluster_ids: np.ndarray,
    eps: float,
    *,
    keep: str = "hard",
    rule: str = "greedy",
    scores: np.ndarray | None = None,
    sample_ids: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
    seed: int = 0,
    block: int | None = None,
    device: Any = "cpu",
    stats: dict | None = None,
) -> SemanticDuplicates:
    """SemDeDup: near duplicates inside each k-means cluster.

    ``x``: ``(N, D)`` embeddings (rows re-normalised per block); ``cluster_ids``: ``(N,)`` from
    :func:`~dataprune.metrics.prototypes.assign` (rows with id < 0 are left out). Two samples of
    one cluster are duplicates when their cosine similarity is >= ``1 - eps`` (``eps`` in [0, 2];
    use ``eps > 1e-6`` so float rounding does not split identical rows; ``rule="semdedup"`` needs
    ``>``). ``rule`` says which similar rows go and ``keep`` the order keepers are chosen in
    (:mod:`~dataprune.metrics.keepers`; the defaults, greedy and hard, are the CLI's); for ``"easy"``/``"hard"``
    without ``scores`` the score is the cosine distance to ``centroids[cluster]`` (default: the
    normalised mean of the cluster's rows).

    Work is tiled: for every cluster, ``block x block`` similarity tiles over its upper triangle
    (default :data:`DEFAULT_BLOCK`). Peak memory is one tile: ``4 * block**2`` bytes of float32
    similarities, plus, for a tile that holds pairs, two bool masks and the pair indices (at most
    ``22 * block**2`` bytes when every pair is a duplicate); besides that O(cluster size) vectors.
    ``stats`` (a dict, optional) receives ``block``, ``tiles``, ``max_tile_elems``, ``pairs`` (similar
    pairs for components, removed rows otherwise), ``clusters`` and ``largest_cluster``.
    """
    import torch

    _check_2d(x)
    check_keep(keep)
    check_rule(rule)
    n = int(x.shape[0])
    cid = np.asarray(cluster_ids).astype(np.int64)
    if cid.shape != (n,):
        raise ValueError(f"{cid.shape[0]} cluster ids for {n} embeddings")
    eps = float(eps)
    if not 0.0 <= eps <= 2.0:
        raise ConfigError(f"dedup eps must be in [0, 2] (similarity >= 1 - eps), got {eps}")
    thr = 1.0 - eps
    b = int(block or DEFAULT_BLOCK)
    if b < 1:
        raise ConfigError(f"dedup block must be positive, got {b}")

    st = {"block": b, "tiles": 0, "max_tile_elems": 0, "pairs": 0, "clusters": 0, "largest_cluster": 0}
    if rule != "components":
        res = _ordered(x, cid, thr, b, rule, keep, scores, sample_ids, centroids, seed, device, st)
        if stats is not None:
            stats.update(st)
        return res
    max_sim = np.full(n, np.nan, dtype=np.float32)
    roots = np.arange(n, dtype=np.int64)
    order = np.argsort(cid, kind="stable")
    order = order[cid[order] >= 0]
    sc = cid[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]]) if order.size else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], order.size]
    neg_inf = float("-inf")
    # the default keep score needs each cluster's centroid: summed from the rows the tiles load anyway
    want_cent = keep in ("easy", "hard") and scores is None and centroids is None
    cent_rows: list[np.ndarray] = []  # kept only for clusters that hold a group
    cent_pos = np.full(starts.size, -1, dtype=np.int64)
    for ci, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist())):
        mem = order[lo:hi]  # ascending row indices of this cluster
        nc = hi - lo
        st["clusters"] += 1
        st["largest_cluster"] = max(st["largest_cluster"], nc)
        if nc < 2:
            continue
        parent = np.arange(nc, dtype=np.int64)
        ms = torch.full((nc,), neg_inf, dtype=torch.float32, device=device)
        csum = np.zeros(x.shape[1], dtype=np.float64)
        for i0 in range(0, nc, b):
            xi = load_rows(x, mem[i0 : i0 + b], device)
            i1 = i0 + xi.shape[0]
            if want_cent:
                csum += xi.sum(dim=0).double().cpu().numpy()
            for j0 in range(i0, nc, b):
                xj = xi if j0 == i0 else load_rows(x, mem[j0 : j0 + b], device)
                j1 = j0 + xj.shape[0]
                s = xi @ xj.T
                st["tiles"] += 1
                st["max_tile_elems"] = max(st["max_tile_elems"], s.numel())
                if j0 == i0:
                    s.fill_diagonal_(neg_inf)
                rmax = s.amax(dim=1)
                ms[i0:i1] = torch.maximum(ms[i0:i1], rmax)
                if j0 != i0:
                    ms[j0:j1] = torch.maximum(ms[j0:j1], s.amax(dim=0))
                if float(rmax.max()) >= thr:  # most tiles hold no pair: skip the mask
                    mask = s >= thr
                    if j0 == i0:
                        mask = torch.triu(mask, diagonal=1)
                    ij = torch.nonzero(mask).cpu().numpy()
                    del mask
                    st["pairs"] += int(ij.shape[0])
                    _union(parent, ij[:, 0] + i0, ij[:, 1] + j0)
                del s
        max_sim[mem] = ms.clamp_(-1.0, 1.0).cpu().numpy()
        local = _roots(parent)
        roots[mem] = mem[local]
        if want_cent and (local != np.arange(nc)).any():
            cent_pos[ci] = len(cent_rows)
            cent_rows.append(csum)

    dup_group = _group_ids(roots)
    if keep in ("easy", "hard") and scores is None:
        # cosine distance to the cluster centroid, for group members only (NaN elsewhere)
        in_group = dup_group >= 0
        if want_cent:
            labels = np.full(n, -1, dtype=np.int64)
            labels[in_group] = cent_pos[np.searchsorted(sc[starts], cid[in_group])]
            cent = np.stack(cent_rows) if cent_rows else np.zeros((0, x.shape[1]))
            scores = prototype_distance(x, labels, cent, block=b, device=device)
        else:
            centroids = np.asarray(centroids)
            if in_group.any() and centroids.shape[0] <= cid[in_group].max():
                raise ValueError(f"{centroids.shape[0]} centroids for cluster ids up to {cid.max()}")
            scores = prototype_distance(x, np.where(in_group, cid, -1), centroids, block=b, device=device)
    is_dup = choose_keepers(dup_group, keep, scores=scores, sample_ids=sample_ids, seed=seed)
    if stats is not None:
        stats.update(st)
    return SemanticDuplicates(dup_group, max_sim, is_dup)


def _ordered(x, cid, thr, b, rule, keep, scores, sample_ids, centroids, seed, device, st) -> SemanticDuplicates:
    """``greedy``/``semdedup``: every cluster's rows in keeper order through :func:`ordered_pass`."""
    import torch

    n = cid.shape[0]
    valid = np.flatnonzero(cid >= 0)
    if keep in ("easy", "hard") and scores is None:
        if centroids is None:  # sums of the unit rows of each cluster (prototype_distance normalises)
            sums = torch.zeros((int(cid.max(initial=-1)) + 1, x.shape[1]), dtype=torch.float64)
            for i in range(0, valid.size, b):
                rows = valid[i : i + b]
                sums.index_add_(0, torch.from_numpy(cid[rows]), load_rows(x, rows, device).double().cpu())
            centroids = sums.numpy()
        elif valid.size and np.asarray(centroids).shape[0] <= cid.max():
            raise ValueError(f"{np.asarray(centroids).shape[0]} centroids for cluster ids up to {cid.max()}")
        scores = prototype_distance(x, cid, np.asarray(centroids), block=b, device=device)
    o = keeper_order(valid, keep, scores=scores, sample_ids=sample_ids, seed=seed, n=n)
    o = o[np.argsort(cid[o], kind="stable")]  # by cluster, keeper order inside
    sc = cid[o]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]]) if o.size else np.zeros(0, dtype=np.int64)
    max_sim = np.full(n, np.nan, dtype=np.float32)
    removed = np.zeros(n, dtype=bool)
    root = np.arange(n, dtype=np.int64)
    for lo, hi in zip(starts.tolist(), np.r_[starts[1:], o.size].tolist()):
        mem = o[lo:hi]
        st["clusters"] += 1
        st["largest_cluster"] = max(st["largest_cluster"], hi - lo)
        if hi - lo < 2:
            continue
        rem, att, ms = ordered_pass(x, mem, thr, rule, b, device, st)
        max_sim[mem] = np.clip(ms, -1.0, 1.0)
        removed[mem] = rem
        root[mem] = mem[attached_roots(rem, att)]
    low = np.full(n, n, dtype=np.int64)
    np.minimum.at(low, root, np.arange(n))  # number groups by their lowest row, as components
    return SemanticDuplicates(_group_ids(low[root]), max_sim, removed)


def image_keep(cfg) -> str:
    """The keeper order of image dedup: ``--dedup-keep``, hard when unset (SemDeDup's choice)."""
    return cfg.dedup_keep or "hard"


def dedup_columns(es) -> dict[str, np.ndarray]:
    """The ``dedup`` metric over an :class:`~dataprune.metrics.embeddings.EmbeddingSet` holding every
    row (one process; :mod:`~dataprune.metrics.dedup_dist` partitions the job's rows). Exact copies (bytes or decoded pixels hash equal) joined with SemDeDup's near-duplicates inside
    each k-means cluster (``--dedup-rule``; keeper order ``--dedup-keep``, scored by distance to the
    centroid). Exact groups keep one copy each (the first in keeper order); with greedy/semdedup a
    row is a duplicate when either removes it (exact copies have one embedding, so they share a cluster
    and a group, and the same keeper order picks the same copy)."""
    cfg, c, stats = es.cfg, es.clusters(), {}
    rule, keep = cfg.dedup_rule, image_keep(cfg)
    sem = semantic_duplicates(es.x, c.cluster, cfg.dedup_eps, keep=keep, rule=rule, scores=c.dist,
                              sample_ids=es.ids, centroids=c.centroids, seed=cfg.seed, device=es.device, stats=stats)
    exact = exact_groups(list(es.hashes))
    groups = union_groups(exact, sem.dup_group)
    is_dup = choose_keepers(groups if rule == "components" else exact, keep, scores=c.dist,
                            sample_ids=es.ids, seed=cfg.seed)
    if rule != "components":
        is_dup |= sem.is_duplicate
    es.info.update(dedup_eps=cfg.dedup_eps, dedup_keep=keep, dedup_rule=rule, duplicates=int(is_dup.sum()),
                   exact_duplicates=int(choose_keepers(exact, "first").sum()), dedup_tiles=stats.get("tiles"))
    max_sim = np.where(exact >= 0, 1.0, sem.dup_max_sim).astype(np.float32)
    return {"dup_group": groups.astype(np.int64), "dup_max_sim": max_sim, "is_duplicate": is_dup}

