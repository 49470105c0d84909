"""Prototype (k-means + assignment) and near-duplicate timings on clustered embeddings (issue 5).

    python benchmarks/bench_embed.py                 # N=200,000  D=512  K=1000  iters=5  repeats=3
    python benchmarks/bench_embed.py --quick         # N=20,000 smoke run

Data: ``--centres`` random unit centres, each row = a centre + Gaussian noise (cosine to its centre
about 0.7), normalised, float32; then ``--dup-frac`` of the rows are overwritten by near copies of
other rows (cosine about 0.995) so that duplicate detection has something to find.

Figures (medians over ``--repeats``, each beside a limit measured in the same run):

- ours: ``init_centroids`` (greedy k-means++ on a seeded 4096-row subset) + ``spherical_kmeans``
  (torch backend, ``--iters`` Lloyd iterations) + ``assign`` (one streaming pass);
- faiss: ``faiss.Kmeans(spherical=True)`` with its own init and the same iterations on the same
  matrix, plus its assignment (``index.search(x, 1)``), when faiss is installed;
- the matmul floor: one ``N x D x K`` float32 matmul at the sgemm rate measured here (a k-means
  iteration or an assignment pass cannot be faster than that);
- ``semantic_duplicates`` on our clusters, with precision/recall against the planted copies.

``--iters`` defaults to 5 so the whole run fits in a few minutes on 2 cores (faiss's own default is
25); k-means time grows linearly with it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def make_data(n: int, dim: int, centres: int, dup_frac: float, seed: int):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= np.float32(1.0 / np.sqrt(dim))  # noise of norm ~1 → cosine to the centre ~0.7
    x += c[rng.integers(centres, size=n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n_dup = int(n * dup_frac)
    dst = rng.choice(n, size=2 * n_dup, replace=False)
    src, dst = dst[:n_dup], dst[n_dup:]
    y = x[src] + np.float32(0.1 / np.sqrt(dim)) * rng.standard_normal((n_dup, dim), dtype=np.float32)
    x[dst] = y / np.linalg.norm(y, axis=1, keepdims=True)
    truth = np.zeros(n, dtype=bool)
    truth[src] = truth[dst] = True
    return x, truth


def sgemm_rate(dim: int, k: int) -> float:
    """Measured float32 matmul rate (FLOP/s) of torch on a (8192 x dim) @ (dim x k) tile."""
    import torch

    a = torch.randn(8192, dim)
    b = torch.randn(dim, k)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2.0 * 8192 * dim * k / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--centres", type=int, default=1000)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eps", type=float, default=0.02)
    p.add_argument("--dup-frac", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="set torch and faiss thread counts (default: leave)")
    p.add_argument("--quick", action="store_true", help="N=20,000, K=100, 1 repeat")
    a = p.parse_args()
    if a.quick:
        a.n, a.k, a.centres, a.repeats = 20_000, 100, 100, 1

    import torch

    from dataprune.metrics.dedup import semantic_duplicates
    from dataprune.metrics.kmeans import assign, init_centroids, spherical_kmeans

    faiss = None
    if not a.no_faiss:
        try:
            import faiss
        except ImportError:
            pass
    if a.threads:
        torch.set_num_threads(a.threads)
        if faiss is not None:
            faiss.omp_set_num_threads(a.threads)

    t = time.perf_counter()
    x, truth = make_data(a.n, a.dim, a.centres, a.dup_frac, a.seed)
    print(f"data: {a.n:,} x {a.dim} float32 ({x.nbytes / 2**20:.0f} MiB), {a.centres} centres, "
          f"{truth.sum():,} rows in planted near-duplicate pairs; made in {time.perf_counter() - t:.1f} s")
    threads = f"torch threads {torch.get_num_threads()}"
    if faiss is not None:
        threads += f", faiss {faiss.__version__} omp threads {faiss.omp_get_max_threads()}"
    print(f"K={a.k}  iters={a.iters}  repeats={a.repeats}  eps={a.eps}  ({threads})")

    rate = sgemm_rate(a.dim, a.k)
    floor = 2.0 * a.n * a.dim * a.k / rate
    print(f"limit: torch sgemm {rate / 1e9:.1f} GFLOP/s → one N x D x K similarity matmul = {floor:.2f} s "
          f"(k-means floor = (iters + 1) x that = {(a.iters + 1) * floor:.1f} s)")

    ours, theirs = [], []
    for r in range(a.repeats):
        t0 = time.perf_counter()
        c0 = init_centroids(x, a.k, seed=r)
        t1 = time.perf_counter()
        c = spherical_kmeans(x, a.k, iters=a.iters, seed=r, backend="torch", init=c0)
        t2 = time.perf_counter()
        ids, dist = assign(x, c)
        t3 = time.perf_counter()
        ours.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0, float(1.0 - dist.mean())))
        line = f"  run {r}: ours init {t1 - t0:.1f} s + lloyd {t2 - t1:.1f} s + assign {t3 - t2:.1f} s = {t3 - t0:.1f} s"
        if faiss is not None:
            t0 = time.perf_counter()
            km = faiss.Kmeans(a.dim, a.k, niter=a.iters, spherical=True, seed=r, verbose=False)
            km.train(x)
            t1 = time.perf_counter()
            sims, _ = km.index.search(x, 1)
            t2 = time.perf_counter()
            theirs.append((t1 - t0, t2 - t1, t2 - t0, float(sims.mean())))
            line += f" | faiss train {t1 - t0:.1f} s + search {t2 - t1:.1f} s = {t2 - t0:.1f} s"
        print(line, flush=True)

    med = lambda rows, i: statistics.median(row[i] for row in rows)  # noqa: E731
    print("\nprototypes (k-means fit + assignment of all rows), medians:")
    print(f"  ours (torch):  {med(ours, 3):7.1f} s  = init {med(ours, 0):.1f} + {a.iters} iters {med(ours, 1):.1f} "
          f"+ assign {med(ours, 2):.1f}   mean cos to centroid {med(ours, 4):.4f}")
    if theirs:
        print(f"  faiss own:     {med(theirs, 2):7.1f} s  = train {med(theirs, 0):.1f} + search {med(theirs, 1):.1f}"
              f"                 mean cos to centroid {med(theirs, 3):.4f}")
        print(f"  ratio ours/faiss: total {med(ours, 3) / med(theirs, 2):.2f}, "
              f"per-iteration Lloyd {med(ours, 1) / med(theirs, 0):.2f}, assignment {med(ours, 2) / med(theirs, 1):.2f}")
    print(f"  floor (sgemm): {(a.iters + 1) * floor:7.1f} s   → ours at {(a.iters + 1) * floor / (med(ours, 1) + med(ours, 2)):.0%} "
          "of the matmul rate in Lloyd + assign")

    dd = []
    for r in range(a.repeats):
        st: dict = {}
        t0 = time.perf_counter()
        res = semantic_duplicates(x, ids, a.eps, keep="easy", stats=st)
        dd.append(time.perf_counter() - t0)
    pred = res.dup_group >= 0
    tp = int((pred & truth).sum())
    prec = tp / max(1, int(pred.sum()))
    rec = tp / max(1, int(truth.sum()))
    sizes = np.bincount(ids, minlength=a.k)
    pair_flops = float((sizes.astype(np.float64) ** 2).sum()) * a.dim  # upper triangle x 2 flops
    print("\nnear-duplicates (semantic_duplicates on our clusters):")
    print(f"  time {statistics.median(dd):.2f} s (median of {len(dd)}); {st['tiles']:,} tiles of <= {st['block']}², "
          f"largest cluster {st['largest_cluster']:,}, {st['pairs']:,} pairs ≥ {1 - a.eps:.2f}, "
          f"{len(np.unique(res.dup_group[pred])):,} groups, {int(res.is_duplicate.sum()):,} flagged duplicates")
    print(f"  limit: the within-cluster matmuls alone = {pair_flops / rate:.2f} s at the sgemm rate")
    print(f"  planted near-duplicates: precision {prec:.3f}, recall {rec:.3f}")


if __name__ == "__main__":
    main()
