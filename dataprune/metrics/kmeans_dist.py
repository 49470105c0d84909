"""Spherical k-means across the ranks of a torchrun job (any world size, 1 included).

Each rank holds only its own rows (the shards it embedded) and, of those, its share of the fitting
sample; nothing of size N x D is ever gathered.

- **Fitting sample**: the ``sample`` rows with the smallest ``mix64(sample_id, seed)`` over the whole
  job (an exact global threshold, found from an all-reduced histogram of the hashes' top 16 bits and
  the few values of the boundary bin), so it is the same rows whatever the world size or shard
  split. Rows with equal ids (not expected) are taken or left together.
- **Initialisation**: the ``init_sample`` fitting rows with the smallest hashes are gathered on
  rank 0 (in hash order), which runs :func:`~dataprune.metrics.kmeans.init_centroids` on them and
  broadcasts the centroids.
- **Lloyd iterations**: every rank assigns its fitting rows in blocks that never cross a shard (so a
  block is the same rows whatever rank runs it), sums each shard's rows per centroid (float32, a
  serial loop: the same bits for the same shard; on an accelerator, whose adds are atomic, the rows
  themselves are converted) and adds the shard sums in **fixed point** (int64, 2**-30 units per
  coordinate, truncated), which add exactly in any order; the sums and counts are all-reduced and every rank
  normalises them the same way. A cluster left empty gets the globally farthest rows (lowest
  similarity to their centroid, ties → lower hash).

**Memory per rank.** The fitting sample (its share of ``--kmeans-sample`` rows as stored, float16:
``D * 2`` bytes a row, plus 12 bytes a row of hashes and similarities), one search block, and while
the sample is chosen 9 bytes a row of the rank (its hash and a mask; the hashing and the histogram
run in :data:`HASH_CHUNK`-row chunks). Assignment streams the rows block by block into the two
columns it returns (int32 cluster, float32 distance: 8 bytes a row).

**Tolerance.** Exact integer accumulation makes the update independent of the world size and of the
order blocks arrive in, so with the same seed the centroids are *bit-identical* to one process's
whenever each block's matmul gives the same bits wherever it runs — the case on one machine
(observed with 1 and 2 gloo ranks, 2 and 1 threads). A BLAS that rounds a row differently by thread
count or machine can move a centroid by float rounding (~1e-7 per iteration); a row at an exact
tie can then change cluster. The tests hold 2 ranks to one process at ``atol=1e-6`` on centroids and
exactly on assignments.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import DataPruneError, check_stop
from ..ids import mix64
from .kmeans import auto_block, default_init_sample, init_centroids, load_rows
from .rows import trim_heap

#: Fixed-point scale of the centroid sums: |coordinate| <= 1, so N rows fit an int64 for N < 2**33.
FIXED = float(1 << 30)
#: Rows hashed or scanned at a time while choosing the fitting sample.
HASH_CHUNK = 1 << 16
#: How long a collective waits for the other ranks before it fails (seconds).
TIMEOUT_S = 1800


class RankLost(DataPruneError):
    """Another rank of the job stopped (or did not answer in time) during a collective step."""

    exit_code = 1


class Comm:
    """The collectives the global steps use: over a gloo process group (CPU tensors, whatever the
    job's default backend), or nothing at all for one process. A failed collective — a rank died or
    timed out — is a :class:`RankLost` naming this rank and the step, on every surviving rank."""

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None):
        self.rank, self.world, self.group = int(rank), int(world), group

    @classmethod
    def from_job(cls, rank: int, world: int, timeout_s: float = TIMEOUT_S) -> "Comm":
        if world <= 1:
            return cls()
        import datetime

        import torch.distributed as dist

        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        return cls(rank, world, group)

    def _run(self, step: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RuntimeError as e:  # gloo: "Connection closed by peer", "Timed out waiting ..."
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise RankLost(f"rank {self.rank} of {self.world}: another rank stopped during {step} ({why}); "
                           "see its error above, then run the same command again to resume") from None

    def all_reduce(self, a: np.ndarray, step: str) -> np.ndarray:
        """Element-wise sum over the ranks (int64 / float64 numpy arrays)."""
        if self.world == 1:
            return a
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(a).copy())
        self._run(step, lambda: dist.all_reduce(t, group=self.group))
        return t.numpy()

    def all_gather(self, obj: Any, step: str) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world
        self._run(step, lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def gather(self, obj: Any, step: str) -> list | None:
        """Every rank's ``obj`` on rank 0 (None on the others)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list | None = [None] * self.world if self.rank == 0 else None
        self._run(step, lambda: dist.gather_object(obj, out, dst=dist.get_global_rank(self.group, 0), group=self.group))
        return out

    def broadcast(self, obj: Any, step: str, src: int = 0) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._run(step, lambda: dist.broadcast_object_list(box, src=src, group=self.group))
        return box[0]

    def barrier(self, step: str) -> None:
        if self.world > 1:
            import torch.distributed as dist

            self._run(step, lambda: dist.barrier(group=self.group))


# ----------------------------------------------------------------------------------------------
# the fitting sample


def sample_threshold(h: np.ndarray, m: int, comm: Comm) -> int | None:
    """The largest hash of the ``m`` smallest over every rank's ``h`` (uint64), or None when ``m``
    covers every row. Rows with ``h <= threshold`` are the sample. ``h`` is read in chunks of
    :data:`HASH_CHUNK` (no temporary the size of ``h``)."""
    n = int(comm.all_reduce(np.array([h.shape[0]], np.int64), "k-means sample")[0])
    if m >= n:
        return None
    hist = np.zeros(1 << 16, np.int64)
    for a in range(0, h.shape[0], HASH_CHUNK):
        hist += np.bincount((h[a : a + HASH_CHUNK] >> np.uint64(48)).astype(np.int64), minlength=1 << 16)
    hist = comm.all_reduce(hist, "k-means sample")
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, m))  # the bin holding the m-th smallest
    below = int(cum[b - 1]) if b else 0
    mine = [c[(c >> np.uint64(48)) == np.uint64(b)] for c in (h[a : a + HASH_CHUNK] for a in range(0, h.shape[0], HASH_CHUNK))]
    mine = np.sort(np.concatenate(mine)) if mine else np.zeros(0, np.uint64)
    vals = np.sort(np.concatenate(comm.all_gather(mine, "k-means sample")))
    return int(vals[m - below - 1])


def row_hashes(ids: np.ndarray, seed: int) -> np.ndarray:
    """``mix64(ids, seed)`` computed in chunks (mix64's temporaries stay one chunk long)."""
    h = np.empty(ids.shape[0], np.uint64)
    for a in range(0, ids.shape[0], HASH_CHUNK):
        h[a : a + HASH_CHUNK] = mix64(ids[a : a + HASH_CHUNK], seed)
    return h


def _pick_smallest(h: np.ndarray, m: int) -> np.ndarray:
    """Positions of the ``m`` smallest of ``h`` (ties → lower position), in that order."""
    if m >= h.shape[0]:
        return np.argsort(h, kind="stable")
    part = np.argpartition(h, m - 1)[:m]
    return part[np.lexsort((part, h[part]))]


def gathered_init(xf: np.ndarray, hf: np.ndarray, k: int, m: int, seed: int, method: str, comm: Comm) -> np.ndarray:
    """Initial centroids from the ``m`` fitting rows with the smallest hashes of the job: gathered
    on rank 0, fitted there, broadcast."""
    mine = _pick_smallest(hf, m)
    got = comm.gather((hf[mine], load_rows(xf, mine, "cpu").numpy()), "k-means init")
    c0 = None
    if comm.rank == 0:
        hs = np.concatenate([g[0] for g in got])
        xs = np.concatenate([g[1] for g in got]) if hs.size else np.zeros((0, xf.shape[1]), np.float32)
        o = _pick_smallest(hs, m)
        c0 = init_centroids(xs[o], k, seed=seed, method=method, init_sample=len(o))
    return comm.broadcast(c0, "k-means init")


# ----------------------------------------------------------------------------------------------
# Lloyd


def blocks(segments: list[tuple[int, int]], block: int):
    """``(start, end)`` blocks of at most ``block`` rows that never cross a segment (a shard)."""
    for s, e in segments:
        for b in range(s, e, block):
            yield b, min(e, b + block)


#: Rows per block of the search (at most; fewer for a large K, see :func:`search_block`).
SEARCH_BLOCK = 2048


def search_block(k: int) -> int:
    """Rows per search block: 2048, or fewer so that one ``block x k`` tile stays within 32 MiB.
    Measured on one core (K=1000, D=256): 2048-row blocks into kept buffers ran 1.3x faster than
    8192-row blocks into fresh tiles, on par with faiss's own search."""
    return int(min(SEARCH_BLOCK, auto_block(k)))


class Search:
    """Nearest centroid of rows block by block, into buffers kept across blocks (a fresh multi-MiB
    tile per block costs its page faults every time). ``backend``: a torch matmul, or faiss's
    ``knn`` on the CPU."""

    def __init__(self, centroids: Any, block: int, device: Any = "cpu", backend: str = "torch"):
        import torch

        self.c = torch.as_tensor(centroids).to(device=device, dtype=torch.float32)
        k, dim = self.c.shape
        self.ct = self.c.T.contiguous()
        self.backend = backend if torch.device(device).type == "cpu" else "torch"
        self.x = torch.empty(block, dim, device=device)
        self.norm = torch.empty(block, 1, device=device)
        self.sim = torch.empty(block, k, device=device)

    def unit(self, rows: Any):
        """``rows`` (a tensor or array, any float dtype) as unit float32 rows in the kept buffer."""
        import torch

        m = int(rows.shape[0])
        xb = self.x[:m]
        xb.copy_(torch.as_tensor(rows))
        torch.linalg.vector_norm(xb, dim=1, keepdim=True, out=self.norm[:m])
        return xb.div_(self.norm[:m].clamp_min_(1e-12))

    def nearest(self, xb):
        """(max cosine, argmax) of unit rows ``xb`` (a view of :meth:`unit`'s buffer)."""
        import torch

        if self.backend == "faiss":
            import faiss

            sim, idx = faiss.knn(xb.numpy(), self.c.numpy(), 1, metric=faiss.METRIC_INNER_PRODUCT)
            return torch.from_numpy(sim[:, 0]), torch.from_numpy(idx[:, 0].astype(np.int64))
        sim = self.sim[: xb.shape[0]]
        torch.mm(xb, self.ct, out=sim)
        return sim.max(dim=1)


def lloyd(xf: Any, segments: list[tuple[int, int]], hf: np.ndarray, c0: np.ndarray, iters: int, comm: Comm, *,
          device: Any = "cpu", block: int | None = None, backend: str = "torch",
          progress: Callable[[str, int, int], None] | None = None) -> np.ndarray:
    """``iters`` Lloyd iterations over this rank's fitting rows ``xf`` (float16 or float32 numpy,
    normalised block by block; in ``segments``) with the other ranks'; returns the ``(k, D)``
    float32 centroids (numpy). ``backend``: the nearest-centroid search (:class:`Search`)."""
    import torch

    k, dim = c0.shape
    b = int(block or search_block(k))
    xt = torch.from_numpy(np.ascontiguousarray(xf)).to(device)
    c = torch.from_numpy(np.asarray(c0, dtype=np.float32)).to(device)
    best = torch.empty(xt.shape[0], dtype=torch.float32, device=device)
    on_cpu = torch.device(device).type == "cpu"
    blk = torch.empty(k, dim, dtype=torch.float32, device=device)
    for it in range(int(iters)):
        check_stop()
        search = Search(c, b, device, backend)
        sums = torch.zeros(k, dim, dtype=torch.int64, device=device)
        counts = torch.zeros(k, dtype=torch.int64, device=device)
        for seg in segments:
            blk.zero_()
            for s, e in blocks([seg], b):
                xb = search.unit(xt[s:e])
                bs, bi = search.nearest(xb)
                if on_cpu:  # float32 sums of one shard's rows (a serial loop: the same bits wherever it runs)
                    blk.index_add_(0, bi, xb)
                else:  # atomics on accelerators: only integer adds are order-free
                    sums.index_add_(0, bi, torch.round(xb * FIXED).to(torch.int64))
                counts += torch.bincount(bi, minlength=k)
                best[s:e] = bs
            if on_cpu:
                sums += blk.mul_(FIXED).to(torch.int64)  # exact scaling, then truncation: the same integers anywhere
        tot = comm.all_reduce(sums.cpu().numpy(), "k-means").astype(np.float64)
        cnt = comm.all_reduce(counts.cpu().numpy(), "k-means")
        norms = np.linalg.norm(tot, axis=1)
        empty = (cnt == 0) | (norms <= 0)
        new = (tot / np.where(empty, 1.0, norms)[:, None]).astype(np.float32)
        if empty.any():
            new[empty] = _farthest(xt, best, hf, int(empty.sum()), comm)
        c = torch.from_numpy(new).to(device)
        if progress is not None:
            progress("fit", it + 1, int(iters))
    return c.cpu().numpy()


def _farthest(xt, best, hf: np.ndarray, e: int, comm: Comm) -> np.ndarray:
    """The ``e`` fitting rows of the job least similar to their centroid (ties → lower hash)."""
    import torch

    bn = best.cpu().numpy()
    o = np.lexsort((hf, bn))[:e]
    rows = torch.nn.functional.normalize(xt[torch.from_numpy(o).to(xt.device)].float(), dim=1, eps=1e-12).cpu().numpy()
    got = comm.all_gather((bn[o], hf[o], rows),
                          "k-means refill")
    bs, hs, xs = (np.concatenate([g[j] for g in got]) for j in range(3))
    rows = xs[np.lexsort((hs, bs))[:e]]
    if rows.shape[0] < e:  # fewer fitting rows than clusters left empty: they stay zero
        rows = np.vstack([rows, np.zeros((e - rows.shape[0], xs.shape[1]), np.float32)])
    return rows


def fit(x: Any, segments: list[tuple[int, int]], ids: np.ndarray, k: int, comm: Comm, *, iters: int, seed: int,
        sample: int | None, init: str = "k-means++", init_sample: int | None = None, device: Any = "cpu",
        block: int | None = None, backend: str = "torch", progress: Callable[[str, int, int], None] | None = None) -> tuple[np.ndarray, int]:
    """Centroids fitted on the job's seeded sample; ``x`` this rank's rows (any row set, re-normalised
    per block), ``segments`` its shards as row ranges, ``ids`` their sample ids. Returns
    ``(centroids, rows fitted on over the job)``."""
    h = row_hashes(ids, seed)
    thr = sample_threshold(h, int(sample) if sample is not None else (1 << 62), comm)
    take = np.ones(h.shape[0], bool) if thr is None else h <= np.uint64(thr)
    # this rank's share as stored (float16 rows stay float16: half the memory), with its shard boundaries
    xf = np.empty((int(take.sum()), int(x.shape[1])), np.float16 if np.dtype(x.dtype) == np.float16 else np.float32)
    segs, at = [], 0
    for s, e in segments:
        rows = np.flatnonzero(take[s:e]) + s
        for i in range(0, rows.size, 65536):
            xf[at + i : at + min(rows.size, i + 65536)] = np.asarray(x[rows[i : i + 65536]])
        if rows.size:
            segs.append((at, at + rows.size))
            at += rows.size
    hf = h[take]
    del h, take
    n_fit = int(comm.all_reduce(np.array([xf.shape[0]], np.int64), "k-means sample")[0])
    m = min(n_fit, max(int(k), int(init_sample) if init_sample else default_init_sample(k)))
    c0 = gathered_init(xf, hf, k, m, seed, init, comm)
    c = lloyd(xf, segs, hf, c0, iters, comm, device=device, block=block, backend=backend, progress=progress)
    del xf, hf
    trim_heap()  # the sample's pages back to the system before the steps that follow
    return c, n_fit


def total_rows(n: int, comm: Comm) -> int:
    return int(comm.all_reduce(np.array([n], np.int64), "embedding rows")[0])


def assign_segments(x: Any, segments: list[tuple[int, int]], centroids: np.ndarray, *, device: Any = "cpu",
                    block: int | None = None, backend: str = "torch") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each of this rank's rows (shard-aligned blocks, see the module docstring):
    ``(cluster int32, cosine distance float32)`` as :func:`~dataprune.metrics.kmeans.assign`."""
    import torch

    c = torch.nn.functional.normalize(torch.from_numpy(np.asarray(centroids, np.float32)).to(device), dim=1, eps=1e-12)
    n, b = int(x.shape[0]), int(block or search_block(c.shape[0]))
    ids, dist = np.empty(n, np.int32), np.empty(n, np.float32)
    search = Search(c, b, device, backend)
    for s, e in blocks(segments, b):
        bs, bi = search.nearest(search.unit(np.asarray(x[s:e])))
        ids[s:e] = bi.cpu().numpy()
        dist[s:e] = (1.0 - bs).clamp_(0.0, 2.0).cpu().numpy()
    return ids, dist


__all__ = ["Comm", "RankLost", "FIXED", "Search", "assign_segments", "fit", "lloyd", "sample_threshold", "search_block", "total_rows"]
