"""The global embed metrics (k-means + assignment + prototypes + dedup) in one process and across 2
torchrun ranks (gloo, CPU), on clustered float16 embeddings in the embedding cache's format (issue 16).

    python benchmarks/bench_embed_dist.py --rows 200000 --sweep 100000   # the reduced size
    python benchmarks/bench_embed_dist.py                               # 2,000,000 x 256, K = 1000 (+ the 1M sweep)

Data: ``--shards`` cache shards (``emb-N.npy`` float16, ``base-N.parquet``) of rows drawn around
``--k`` random unit centres (cosine to the centre ~0.7), 2 % of them overwritten by near copies
(cosine ~0.998) of other rows, written shard by shard (never N x D in memory); the workers read
them memory-mapped block by block through ``engine.sharded.job_metrics``.

Printed, each beside its limit from the same run:

- the columns of 2 ranks vs 1 process: ``cluster``, ``dup_group``, ``is_duplicate`` identical,
  max |Δ prototypes|;
- wall time of each job and of its k-means fit (k-means++ init + ``--iters`` Lloyd iterations on the
  ``kmeans_sample`` rows chosen by hash); then, in this process, our Lloyd iterations beside
  ``faiss.Kmeans(spherical=True)`` on the same rows from the same initial centroids (medians of 3
  interleaved runs of 5 iterations, the one-process job's threads);
- peak RSS of every rank (``ru_maxrss``) beside the one-process peak (target ≤ 0.6 ×) and beside
  N x D x 2 bytes (no rank may hold the matrix); also the part above the **import floor**: the peak
  RSS of a process that imports what a rank imports (torch, torch.distributed, pyarrow, dataprune's
  engine and metrics) and exits, measured in the same run (~550 MiB here, the same in every process);
  and each step's own peak above that floor (``VmHWM`` reset between steps through
  ``/proc/self/clear_refs``): loading the rank's base columns, k-means fit, assignment, prototypes +
  dedup;
- a **row-count sweep** (``--sweep``, plus ``--rows``): the peak per process above the floor of 1
  process and of each of 2 ranks at every size, and its growth per added row — the global step's
  memory is a budget (the fitting sample, ``dedup_dist.BATCH_ROWS``, tiles, chunks) plus the columns
  a rank returns and the labels it holds (~40 bytes a row), not the ~350 bytes a row of working
  arrays it held before. A sweep size runs with K scaled so that clusters keep their size (a dedup
  tile grows with its cluster up to the block).

Both peaks sit on the same floor + budget, so 2 ranks cannot reach 0.6 x one process's peak by
construction at these sizes (the ratio is printed as measured; only the per-row part halves).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_cache(d: str, rows: int, dim: int, k: int, shards: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    os.makedirs(d, exist_ok=True)
    sizes = np.full(shards, rows // shards)
    sizes[: rows % shards] += 1
    for i, n in enumerate(sizes.tolist()):
        r = np.random.default_rng([seed, i])
        x = centres[r.integers(k, size=n)] + r.standard_normal((n, dim), dtype=np.float32) / np.float32(np.sqrt(dim))
        m = n // 50  # near copies inside the shard
        src, dst = r.choice(n, size=(2, m), replace=False)
        x[dst] = x[src] + np.float32(0.05 / np.sqrt(dim)) * r.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(os.path.join(d, f"emb-{i:06d}.npy"), x.astype(np.float16))
        pq.write_table(pa.table({"emb_row": pa.array(np.arange(n, dtype=np.int32)), "label": pa.array(np.full(n, -1, np.int64)),
                                 "sample_id": pa.array(r.integers(0, 2**63, size=n, dtype=np.uint64)),
                                 "bytes_hash": pa.array(r.integers(1, 2**63, size=n, dtype=np.uint64)),
                                 "pixel_hash": pa.array(r.integers(1, 2**63, size=n, dtype=np.uint64))}),
                       os.path.join(d, f"base-{i:06d}.parquet"))
    with open(os.path.join(d, "n"), "w") as f:
        f.write(str(shards))


def worker(cache: str, out: str, k: int, iters: int, sample: int) -> None:
    """One rank (or the one process) of the job: the global metrics, timed; columns saved."""
    from types import SimpleNamespace

    from dataprune.distributed import dist_info
    from dataprune.engine.sharded import job_metrics
    from dataprune.metrics import get_metric

    rank, world = dist_info()
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    n = int(open(os.path.join(cache, "n")).read())
    cfg = SimpleNamespace(out=out, clusters=k, kmeans_iters=iters, kmeans_sample=sample, kmeans_backend="torch", seed=0,
                          dedup_eps=0.01, dedup_keep="hard", dedup_rule="greedy")
    p = SimpleNamespace(cfg=cfg, shards=[SimpleNamespace(index=i) for i in range(n)], num_classes=1,
                        metrics=[get_metric("prototypes"), get_metric("dedup")])
    marks: dict[str, float] = {}
    steps: dict[str, int] = {}

    def step_peak(name: str) -> None:
        """This step's peak RSS (VmHWM since the last reset), then the high-water mark reset."""
        steps[name] = hwm()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:  # not Linux, or not allowed: the peaks are then cumulative
            pass

    def emit(kind, info):
        if kind == "kmeans_start":
            marks["start"] = time.perf_counter()
            step_peak("load")
        elif kind == "kmeans_step" and info["stage"] == "fit" and info["done"] == 1:
            marks["iter1"] = time.perf_counter()
        elif kind == "kmeans_step" and info["stage"] == "fit" and info["done"] == info["total"]:
            if "fit" not in marks:
                marks["fit"] = time.perf_counter()
                step_peak("fit")
        elif kind == "kmeans_step" and info["stage"] == "assign":
            marks["assign"] = time.perf_counter()
            step_peak("assign")

    __import__("torch")  # imported in every process, as import_floor() counts it
    t0 = time.perf_counter()
    offsets, cols, info = job_metrics(p, cache, "cpu", emit, rank, world)
    wall = time.perf_counter() - t0
    step_peak("dedup")  # (the high-water mark is reset between steps: the job's peak is the largest step's)
    np.savez(os.path.join(out, f"rank{rank}.npz"), offsets=json.dumps(offsets), **cols)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        lloyd = (marks["fit"] - marks["iter1"]) * iters / max(1, iters - 1)  # iterations only, from their steady rate
        json.dump({"wall": wall, "fit": marks["fit"] - marks["start"], "lloyd": lloyd, "assign": marks["assign"] - marks["fit"],
                   "dedup": time.perf_counter() - marks["assign"], "rss": max(steps.values()),
                   "steps": steps,
                   "duplicates": info.get("duplicates"), "threads": __import__("torch").get_num_threads()}, f)
    if world > 1:
        dist.destroy_process_group()


def hwm() -> int:
    """This process's peak RSS in bytes (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


FLOOR = ("import resource, torch, torch.distributed, pyarrow.parquet, dataprune.engine.sharded, dataprune.metrics, "
         "dataprune.metrics.dedup_dist; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


def import_floor() -> int:
    """Peak RSS of a process that imports what a rank imports, then exits (bytes)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return int(subprocess.run([sys.executable, "-c", FLOOR], capture_output=True, text=True, env=env, check=True).stdout.split()[-1])


def run_job(cache: str, out: str, world: int, a) -> tuple[float, list[dict]]:
    os.makedirs(out)
    me = [os.path.abspath(__file__), "--worker", cache, out, "--k", str(a.k), "--iters", str(a.iters), "--sample", str(a.sample)]
    threads = a.threads or max(1, (os.cpu_count() or 1) // world)  # the cores shared out, as torchrun's ranks on one node
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, *me] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                                                    "--master-port", "29561", *me]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(p.stderr[-4000:])
    wall = time.perf_counter() - t0
    return wall, [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(world)]


def columns(out: str, world: int, sizes: list[int]) -> dict[str, np.ndarray]:
    first = np.concatenate([[0], np.cumsum(sizes)])
    zs = [np.load(os.path.join(out, f"rank{r}.npz")) for r in range(world)]
    cols = {}
    for name in ("cluster", "prototypes", "dup_group", "is_duplicate"):
        full = np.empty(int(first[-1]), zs[0][name].dtype)
        for z in zs:
            for s, off in json.loads(str(z["offsets"])).items():
                s = int(s)
                full[first[s] : first[s + 1]] = z[name][off : off + sizes[s]]
        cols[name] = full
    return cols


def fit_rows(cache: str, shards: int, sample: int):
    """The rows our fit uses (the ``sample`` smallest ``mix64(sample_id, 0)``), float16 as cached,
    with their shard boundaries, and their hashes."""
    import pyarrow.parquet as pq

    from dataprune.ids import mix64
    from dataprune.metrics.kmeans_dist import Comm, sample_threshold

    ids = [pq.read_table(os.path.join(cache, f"base-{i:06d}.parquet"), columns=["sample_id"]).column(0).to_numpy() for i in range(shards)]
    h = mix64(np.concatenate(ids), 0)
    thr = sample_threshold(h, sample, Comm())
    take = h <= np.uint64(thr) if thr is not None else np.ones(h.size, bool)
    parts, segs, at, row = [], [], 0, 0
    for i, ii in enumerate(ids):
        t = take[row : row + ii.size]
        parts.append(np.load(os.path.join(cache, f"emb-{i:06d}.npy"), mmap_mode="r")[t])
        segs.append((at, at + int(t.sum())))
        at, row = at + int(t.sum()), row + ii.size
    return np.vstack(parts), segs, h[take]


def lloyd_vs_faiss(cache: str, shards: int, k: int, iters: int, sample: int, threads: int, repeats: int = 3):
    """Medians of interleaved runs, in this process with ``threads`` threads, from the same initial
    centroids: our Lloyd iterations (``kmeans_dist.lloyd``, one process) and ``faiss.Kmeans.train``."""
    import faiss
    import torch

    from dataprune.metrics.kmeans_dist import Comm, lloyd

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    x16, segs, hf = fit_rows(cache, shards, sample)
    x = x16.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c0 = x[np.random.default_rng(0).choice(x.shape[0], k, replace=False)]
    ours, theirs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lloyd(x16, segs, hf, c0, iters, Comm())
        ours.append(time.perf_counter() - t0)
        km = faiss.Kmeans(x.shape[1], k, niter=iters, spherical=True, seed=1, verbose=False, min_points_per_centroid=1,
                          max_points_per_centroid=x.shape[0])
        t0 = time.perf_counter()
        km.train(x, init_centroids=c0)
        theirs.append(time.perf_counter() - t0)
    return float(np.median(ours)), float(np.median(theirs)), x.shape[0]


def mib(b: float) -> str:
    return f"{b / 2**20:.0f}"


def one_size(d: str, rows: int, a, floor: int, full: bool) -> dict:
    """Both jobs over a cache of ``rows`` rows (written, then removed); with ``full`` the comparison
    lines (identical columns, times, peaks by step, Lloyd vs faiss) are printed. A sweep size runs
    with K scaled so that clusters keep the size they have at ``--rows`` (a dedup tile grows with its
    cluster up to the block, and the pairwise work with its square: the sweep isolates the rows)."""
    import shutil

    if not full:
        a = argparse.Namespace(**{**vars(a), "k": max(2, round(a.k * rows / a.rows))})

    cache = os.path.join(d, f"cache-{rows}")
    t0 = time.perf_counter()
    make_cache(cache, rows, a.dim, a.k, a.shards)
    sizes = [np.load(os.path.join(cache, f"emb-{i:06d}.npy"), mmap_mode="r").shape[0] for i in range(a.shards)]
    print(f"data: {rows:,} x {a.dim} float16 in {a.shards} shards ({rows * a.dim * 2 / 2**30:.2f} GiB), K={a.k}, "
          f"iters={a.iters}, fit sample {min(a.sample, rows):,}; written in {time.perf_counter() - t0:.0f} s; "
          f"load {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores", flush=True)
    w1, r1 = run_job(cache, os.path.join(d, f"one-{rows}"), 1, a)
    w2, r2 = run_job(cache, os.path.join(d, f"two-{rows}"), 2, a)
    c1, c2 = columns(os.path.join(d, f"one-{rows}"), 1, sizes), columns(os.path.join(d, f"two-{rows}"), 2, sizes)
    same = {c: bool(np.array_equal(c1[c], c2[c])) for c in ("cluster", "dup_group", "is_duplicate")}
    print(f"identical 2 ranks vs 1 process: {same}; max |Δ prototypes| = {np.abs(c1['prototypes'] - c2['prototypes']).max():.2e}; "
          f"duplicates {r1[0]['duplicates']:,} / {r2[0]['duplicates']:,}; load {os.getloadavg()[0]:.2f}", flush=True)
    if full:
        for name, wall, rs in (("1 process", w1, r1), ("2 ranks", w2, r2)):
            print(f"{name}: wall {wall:.1f} s (incl. start-up); " + "; ".join(
                f"rank {i}: global step {r['wall']:.1f} s (fit {r['fit']:.1f}, assign {r['assign']:.1f}, dedup {r['dedup']:.1f}), "
                f"peak RSS {mib(r['rss'])} MiB = {r['rss'] / r1[0]['rss']:.2f} x one process "
                f"(above the {mib(floor)} MiB import floor: {mib(r['rss'] - floor)} MiB = "
                f"{(r['rss'] - floor) / max(1, r1[0]['rss'] - floor):.2f} x; by step: "
                + ", ".join(f"{k} {mib(v - floor)}" for k, v in r["steps"].items()) + " MiB), "
                f"{r['rss'] / (rows * a.dim * 2):.2f} x N*D*2, {r['threads']} threads" for i, r in enumerate(rs)))
        threads = a.threads or os.cpu_count() or 1
        it = min(a.iters, 5)
        ours, theirs, m = lloyd_vs_faiss(cache, a.shards, a.k, it, a.sample, threads)
        l1, l2 = r1[0]["lloyd"], max(r["lloyd"] for r in r2)
        print(f"k-means in the jobs: 1 process {r1[0]['fit']:.1f} s with k-means++ init ({l1:.1f} s of Lloyd iterations), "
              f"2 ranks {max(r['fit'] for r in r2):.1f} s ({l2:.1f} s)")
        print(f"Lloyd vs faiss, {m:,} rows, {it} iterations from the same centroids, {threads} threads, medians of 3 interleaved: "
              f"ours {ours:.2f} s, faiss.Kmeans {theirs:.2f} s: {ours / theirs:.2f} x faiss; load {os.getloadavg()[0]:.2f}", flush=True)
    shutil.rmtree(cache)
    print(f"{rows:,} rows, K={a.k}: 1 process {w1:.1f} s, peak by step above the floor "
          + ", ".join(f"{k} {mib(v - floor)}" for k, v in r1[0]["steps"].items()) + " MiB; 2 ranks " + "; ".join(
              ", ".join(f"{k} {mib(v - floor)}" for k, v in r["steps"].items()) for r in r2) + " MiB", flush=True)
    return {"one": r1[0]["rss"], "two": [r["rss"] for r in r2], "same": all(same.values()), "k": a.k}


def main() -> None:
    from dataprune.metrics.dedup_dist import BATCH_ROWS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--sweep", default="1000000,4000000",
                    help="more row counts for the peak-RSS sweep (K scaled with the rows), comma-separated ('' for none)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sample", type=int, default=200_000, help="rows k-means is fitted on (--kmeans-sample)")
    ap.add_argument("--threads", type=int, default=None, help="threads per process (default: the cores / processes)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--worker", nargs=2, metavar=("CACHE", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(*a.worker, a.k, a.iters, a.sample)
    floor = import_floor()
    print(f"import floor (a process importing what a rank imports): {mib(floor)} MiB; dedup batch budget "
          f"{BATCH_ROWS:,} rows; load {os.getloadavg()[0]:.2f}", flush=True)
    sizes = sorted({a.rows, *(int(v) for v in a.sweep.split(",") if v.strip())})
    got = {}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        for n in sizes:
            got[n] = one_size(d, n, a, floor, full=n == a.rows)
    lines = []
    for n, g in got.items():
        two = " / ".join(mib(r - floor) for r in g["two"])
        ratio = " / ".join(f"{r / g['one']:.2f}" for r in g["two"])
        lines.append(f"{n:,} rows (K={g['k']}): 1 process {mib(g['one'] - floor)}, 2 ranks {two} (peak ratio to one process {ratio}), "
                     f"identical {g['same']}")
    print(f"sweep (peak RSS above the {mib(floor)} MiB import floor, MiB): " + "; ".join(lines))
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        one = (got[hi]["one"] - got[lo]["one"]) / (hi - lo)
        ranks = [(got[hi]["two"][i] - got[lo]["two"][i]) / (hi - lo) for i in range(2)]
        print(f"peak growth from {lo:,} to {hi:,} rows, bytes per added row of the job: 1 process {one:.0f}; "
              + "; ".join(f"rank {i} {r:.0f} (~{2 * r:.0f} per row of the rank)" for i, r in enumerate(ranks))
              + f"; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
