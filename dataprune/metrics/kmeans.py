"""Spherical k-means over an ``(N, D)`` array of embeddings, and the streaming nearest-centroid ``assign``.

Pure numerical code over numpy, a ``np.memmap`` of cached float16 embeddings, or a torch tensor.
Rows are read ``block`` at a time, converted to float32 and re-normalised on the fly, so only one
block (and one ``block x K`` similarity tile) is materialised at once; no N x K matrix, no Python
object per row. Reductions are kept as **sums + counts** (:func:`centroid_sums`) so that several
shards, or ranks under ``torch.distributed`` (``all_reduce`` of the two tensors), can be combined
before the normalisation step.

Backends: ``torch`` (CPU or CUDA) and ``faiss`` (``faiss.Kmeans(spherical=True)``, CPU or GPU).
Both start from the same seeded init (:func:`init_centroids`), so they differ only in floating-point
order and in how an empty cluster is refilled (torch: the farthest points; faiss: splitting the
largest cluster).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..config import KMEANS_BACKENDS
from ..errors import ConfigError

BACKENDS = KMEANS_BACKENDS
INIT_METHODS = ("k-means++", "random")
DEFAULT_ITERS = 20
#: Elements of one (block x K) similarity tile when ``block`` is left to us: 2**23 float32 = 32 MiB.
TILE_ELEMS = 1 << 23
_MAX_BLOCK = 65536


def auto_block(k: int, tile_elems: int = TILE_ELEMS) -> int:
    """Rows per block so that one ``(block, k)`` float32 similarity tile holds ``tile_elems`` values."""
    return int(max(256, min(_MAX_BLOCK, tile_elems // max(int(k), 1))))


def default_init_sample(k: int) -> int:
    """Rows k-means++ runs on by default: ``max(4096, 4 k)`` (k-means++ is k sequential passes)."""
    return max(4096, 4 * int(k))


def kmeans_backend(backend: str = "auto") -> str:
    """Resolve ``backend`` to ``"torch"`` or ``"faiss"`` (``auto`` = faiss when importable)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown k-means backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    try:
        import faiss  # noqa: F401
    except ImportError:
        if backend == "faiss":
            raise ConfigError("k-means backend 'faiss' needs faiss: pip install 'dataprune[faiss]'") from None
        return "torch"
    return "faiss"


# ----------------------------------------------------------------------------------------------
# row access


def _num_rows(x: Any) -> int:
    return int(x.shape[0])


def _check_2d(x: Any) -> None:
    if len(x.shape) != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {tuple(x.shape)}")


def load_rows(x: Any, rows: slice | np.ndarray, device: Any = "cpu", *, normalized: bool = False):
    """Rows of ``x`` (a slice or an int index array) as a float32, L2-normalised torch tensor.

    Zero rows stay zero (cosine similarity 0 to everything). ``normalized=True``: the caller
    guarantees unit rows; they are not re-normalised (zero-copy for a float32 CPU array).
    """
    import torch

    if isinstance(x, torch.Tensor):
        sel = x[rows] if isinstance(rows, slice) else x[torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(x.device)]
        t = sel.to(device=device, dtype=torch.float32)
    else:
        a = np.ascontiguousarray(x[rows])
        if not a.flags.writeable:  # read-only memmap: copy the block (torch wants writable memory)
            a = a.astype(np.float32)
        t = torch.from_numpy(a).to(device=device, dtype=torch.float32)
    return t if normalized else torch.nn.functional.normalize(t, dim=1, eps=1e-12)


def normalize_rows(a: np.ndarray) -> np.ndarray:
    """Float32 copy of ``a`` with unit-L2 rows (zero rows stay zero). For sums → prototypes."""
    a = np.asarray(a, dtype=np.float64)
    n = np.linalg.norm(a, axis=1, keepdims=True)
    return (a / np.where(n > 0, n, 1.0)).astype(np.float32)


def _fit_rows(x: Any, sample: int | None, seed: int) -> Any:
    """The rows k-means is fitted on: all of ``x``, or a seeded subset of ``sample`` rows (sorted)."""
    n = _num_rows(x)
    if sample is None or sample >= n:
        return x
    if sample < 1:
        raise ConfigError(f"k-means sample must be positive, got {sample}")
    rng = np.random.default_rng([int(seed), 0x5A4D])
    idx = np.sort(rng.choice(n, size=int(sample), replace=False))
    return x[idx] if not _is_torch(x) else x[_torch_index(idx, x)]


def _is_torch(x: Any) -> bool:
    import torch

    return isinstance(x, torch.Tensor)


def _torch_index(idx: np.ndarray, x: Any):
    import torch

    return torch.from_numpy(idx.astype(np.int64)).to(x.device)


# ----------------------------------------------------------------------------------------------
# init


def init_centroids(
    x: Any,
    k: int,
    *,
    seed: int = 0,
    method: str = "k-means++",
    init_sample: int | None = None,
    n_trials: int | None = None,
) -> np.ndarray:
    """Seeded initial centroids, ``(k, D)`` float32 unit rows, picked from the rows of ``x``.

    ``method="k-means++"``: greedy k-means++ (as scikit-learn) on a seeded subset of
    ``init_sample`` rows (default :func:`default_init_sample`): each step draws ``n_trials``
    (default ``2 + ln k``) candidates with probability proportional to the squared chord distance
    ``2 (1 - cos)`` to the nearest chosen centroid and keeps the one that lowers the potential most
    (this keeps isolated outliers from grabbing centroids). ``method="random"``: ``k`` distinct rows
    of that subset. Computed with numpy on the CPU from ``numpy.random.default_rng([seed, ...])``,
    so the init is the same whatever device or backend the Lloyd iterations then run on.
    """

    _check_2d(x)
    n = _num_rows(x)
    k = int(k)
    if method not in INIT_METHODS:
        raise ConfigError(f"unknown k-means init {method!r}; choose one of {', '.join(INIT_METHODS)}")
    if k < 1 or k > n:
        raise ConfigError(f"k-means needs 1 <= clusters <= samples, got clusters={k} for {n} samples")
    m = min(n, max(k, int(init_sample) if init_sample else default_init_sample(k)))
    rng = np.random.default_rng([int(seed), 0x1417])
    sub = np.arange(n) if m == n else np.sort(rng.choice(n, size=m, replace=False))
    if method == "random":
        pick = np.sort(rng.choice(m, size=k, replace=False))
        return load_rows(x, sub[pick], "cpu").numpy()

    # k sequential steps of small ops: cheaper in numpy than as torch launches
    xs = load_rows(x, slice(None) if m == n else sub, "cpu").numpy()  # (m, D), m <= init_sample
    trials = int(n_trials) if n_trials else 2 + int(math.log(k))
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(m)
    d = np.maximum(1.0 - xs @ xs[chosen[0]], 0.0)  # ∝ squared distance to the nearest chosen centre
    for j in range(1, k):
        cum = np.cumsum(d, dtype=np.float64)
        total = float(cum[-1])
        if total <= 0.0:  # every row coincides with a chosen centre: fall back to seeded uniform picks
            cand = rng.integers(m, size=trials)
        else:
            cand = np.minimum(np.searchsorted(cum, rng.random(trials) * total, side="right"), m - 1)
        dc = np.minimum(d[:, None], np.maximum(1.0 - xs @ xs[cand].T, 0.0))
        best = int(np.argmin(dc.sum(axis=0, dtype=np.float64)))  # ties → first candidate
        chosen[j] = cand[best]
        d = np.ascontiguousarray(dc[:, best])
    return np.ascontiguousarray(xs[chosen])


# ----------------------------------------------------------------------------------------------
# Lloyd steps (torch)


def centroid_sums(
    x: Any,
    centroids: Any,
    *,
    block: int | None = None,
    device: Any = "cpu",
    best_out: Any = None,
    normalized: bool = False,
) -> tuple[Any, Any, float]:
    """One assignment pass: per-centroid sums of the rows assigned to it, counts, and objective.

    Returns ``(sums, counts, objective)``: ``sums`` a float64 ``(K, D)`` torch tensor on ``device``,
    ``counts`` int64 ``(K,)``, ``objective`` = sum over rows of the max cosine similarity. Sums and
    counts add across shards or ranks (``torch.distributed.all_reduce``) before
    :func:`update_centroids`. ``best_out`` (optional ``(N,)`` float32 tensor) receives each row's
    max similarity (used to refill empty clusters from the farthest rows). ``normalized=True``
    skips re-normalising rows the caller knows are unit. Accumulation is deterministic: float32
    ``index_add_`` per block on CPU (a one-hot matmul on other devices), float64 across blocks.
    """
    import torch

    c = torch.as_tensor(centroids).to(device=device, dtype=torch.float32)
    k, dim = c.shape
    n = _num_rows(x)
    b = block or auto_block(k)
    sums = torch.zeros(k, dim, dtype=torch.float64, device=device)
    counts = torch.zeros(k, dtype=torch.int64, device=device)
    obj = 0.0
    on_cpu = torch.device(device).type == "cpu"
    for s in range(0, n, b):
        xb = load_rows(x, slice(s, min(n, s + b)), device, normalized=normalized)
        bs, bi = (xb @ c.T).max(dim=1)
        if on_cpu:
            sums += torch.zeros(k, dim, dtype=torch.float32).index_add_(0, bi, xb).double()
        else:
            onehot = torch.zeros(xb.shape[0], k, device=device, dtype=torch.float32)
            onehot.scatter_(1, bi[:, None], 1.0)
            sums += (onehot.T @ xb).double()
        counts += torch.bincount(bi, minlength=k)
        obj += float(bs.double().sum())
        if best_out is not None:
            best_out[s : s + xb.shape[0]] = bs
    return sums, counts, obj


def update_centroids(sums: Any, counts: Any, refill: Callable[[int], Any] | None = None):
    """New unit centroids from ``sums``/``counts``; empty ones (count 0 or zero sum) are refilled.

    ``refill(e)`` returns ``e`` unit rows for the ``e`` empty clusters (in cluster order); without it
    an empty cluster keeps a zero row. Returns ``(centroids float32 tensor, n_empty)``.
    """
    import torch

    norms = sums.norm(dim=1)
    empty = (counts == 0) | (norms <= 1e-12)
    c = (sums / torch.where(empty, torch.ones_like(norms), norms)[:, None]).float()
    ne = int(empty.sum())
    if ne:
        c[empty] = refill(ne).to(c) if refill is not None else 0.0
    return c, ne


def _lloyd_torch(xf: Any, c0: np.ndarray, iters: int, block: int | None, device: Any, reduce=None,
                 progress: Callable[[str, int, int], None] | None = None) -> np.ndarray:
    """Lloyd iterations over the fit rows. ``reduce(sums, counts)`` (e.g. a ``torch.distributed``
    all-reduce) runs between the assignment pass and the update; refills use local rows;
    ``progress("fit", i, iters)`` after iteration i."""
    import torch

    n = _num_rows(xf)
    dev = torch.device(device)
    # fit rows are held as unit float32 once (no copy when they already are); on an accelerator
    # they move there once. ``sample`` bounds their size.
    xf = _contiguous_unit_float32(xf)
    if dev.type != "cpu":
        xf = torch.from_numpy(xf).to(dev)
    c = torch.from_numpy(np.asarray(c0, dtype=np.float32)).to(dev)
    best = torch.empty(n, dtype=torch.float32, device=dev)

    def farthest(e: int):
        # rows with the lowest max-similarity, ties → lower row index (stable sort)
        order = torch.sort(best, stable=True).indices[:e].cpu().numpy()
        return load_rows(xf, order, dev, normalized=True)

    for i in range(int(iters)):
        sums, counts, _obj = centroid_sums(xf, c, block=block, device=dev, best_out=best, normalized=True)
        if reduce is not None:
            reduce(sums, counts)
        c, _ne = update_centroids(sums, counts, farthest)
        if progress is not None:
            progress("fit", i + 1, int(iters))
    return c.cpu().numpy()


def _lloyd_faiss(xf: Any, c0: np.ndarray, iters: int, seed: int, device: Any) -> np.ndarray:
    import faiss

    k, dim = c0.shape
    xn = _contiguous_unit_float32(xf)
    use_gpu = str(device).startswith("cuda") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(
        dim,
        k,
        niter=int(iters),
        spherical=True,
        seed=int(seed) & 0x7FFFFFFF,  # faiss takes a C int (--seed goes up to 2^32 - 1)
        verbose=False,
        gpu=bool(use_gpu),
        min_points_per_centroid=1,  # no warning for small data
        max_points_per_centroid=max(1, -(-xn.shape[0] // k)),  # never subsample: `sample` decides
    )
    km.train(xn, init_centroids=np.ascontiguousarray(c0, dtype=np.float32))
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, dim)


def _contiguous_unit_float32(x: Any) -> np.ndarray:
    """``x`` as a C-contiguous float32 numpy array with unit rows; no copy if it already is one."""
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous and not isinstance(x, np.memmap):
        ok = True
        for s in range(0, x.shape[0], _MAX_BLOCK):
            nrm = np.einsum("ij,ij->i", x[s : s + _MAX_BLOCK], x[s : s + _MAX_BLOCK])
            if nrm.size and np.abs(nrm - 1.0).max() > 1e-4:
                ok = False
                break
        if ok:
            return x
    out = np.empty(x.shape, dtype=np.float32)
    for s in range(0, x.shape[0], _MAX_BLOCK):
        out[s : s + _MAX_BLOCK] = load_rows(x, slice(s, s + _MAX_BLOCK), "cpu").numpy()
    return out


def spherical_kmeans(
    x: Any,
    k: int,
    *,
    iters: int = DEFAULT_ITERS,
    seed: int = 0,
    sample: int | None = None,
    backend: str = "auto",
    device: Any = "cpu",
    init: str | np.ndarray = "k-means++",
    init_sample: int | None = None,
    block: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> np.ndarray:
    """Spherical k-means; returns ``(k, D)`` float32 unit centroids (numpy).

    ``x``: ``(N, D)`` embeddings (numpy, memmap or torch; rows are re-normalised per block).
    ``sample``: fit on a seeded subset of that many rows (then :func:`assign` everything).
    ``init``: ``"k-means++"`` / ``"random"`` (see :func:`init_centroids`, computed on the fit rows)
    or an explicit ``(k, D)`` array. ``iters`` Lloyd iterations (assign + update), no early stop.
    ``backend``: ``"torch"``, ``"faiss"``, or ``"auto"`` (faiss when importable; see
    :func:`kmeans_backend`). Deterministic for a seed on a given backend, device and thread count
    (the init does not depend on any of them).

    Torch: cosine assignment by matmul in blocks of ``block`` rows (default :func:`auto_block`:
    a ``block x k`` tile of at most 32 MiB), update = normalised per-cluster sums; a cluster left
    empty is re-seeded with the rows farthest from their centroid (lowest max similarity).
    ``progress("fit", i, iters)`` after each torch Lloyd iteration (faiss trains in one call).
    """
    _check_2d(x)
    if int(iters) < 0:
        raise ConfigError(f"k-means iterations must be >= 0, got {iters}")
    name = kmeans_backend(backend)
    xf = _fit_rows(x, sample, seed)
    if isinstance(init, str):
        c0 = init_centroids(xf, k, seed=seed, method=init, init_sample=init_sample)
    else:
        c0 = normalize_rows(np.asarray(init))
        if c0.shape != (int(k), x.shape[1]):
            raise ValueError(f"init centroids have shape {c0.shape}, expected {(int(k), x.shape[1])}")
        if int(k) > _num_rows(xf):
            raise ConfigError(f"k-means needs clusters <= samples, got clusters={k} for {_num_rows(xf)} samples")
    if int(iters) == 0:
        return c0
    if name == "faiss":
        return _lloyd_faiss(xf, c0, iters, seed, device)
    return _lloyd_torch(xf, c0, iters, block, device, progress=progress)


# ----------------------------------------------------------------------------------------------
# scores


def assign(
    x: Any,
    centroids: Any,
    block: int | None = None,
    *,
    device: Any = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row, streamed in blocks.

    Returns ``(cluster_ids int32, cos_distance float32)`` where ``cos_distance = 1 - max cosine
    similarity`` in [0, 2] is the prototype score (higher = harder). Ties go to the lower centroid id.
    """
    import torch

    _check_2d(x)
    c = torch.as_tensor(np.asarray(centroids) if not _is_torch(centroids) else centroids)
    c = torch.nn.functional.normalize(c.to(device=device, dtype=torch.float32), dim=1, eps=1e-12)
    if c.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have dimension {c.shape[1]}, embeddings {x.shape[1]}")
    n = _num_rows(x)
    b = block or auto_block(c.shape[0])
    ids = np.empty(n, dtype=np.int32)
    dist = np.empty(n, dtype=np.float32)
    for s in range(0, n, b):
        xb = load_rows(x, slice(s, min(n, s + b)), device)
        bs, bi = (xb @ c.T).max(dim=1)
        e = s + xb.shape[0]
        ids[s:e] = bi.cpu().numpy()
        dist[s:e] = (1.0 - bs).clamp_(0.0, 2.0).cpu().numpy()
    return ids, dist
