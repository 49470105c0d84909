"""Export throughput beside a plain copy of the same input bytes, measured in the same run.

    python benchmarks/bench_export.py ../shared/data/cifar10 [--frac 0.8] [--repeats 3] [--seed 0]

Selects a seeded ``--frac`` of the samples of ``DATA/train-*.tar`` (a manifest of the dataset,
filtered with pyarrow by shard name and a seeded per-sample draw), then, ``--repeats`` times and in
alternation: exports the selection to new WebDataset shards in a temporary directory, exports it
again with ``--shuffle``, copies the input shards with ``shutil.copyfileobj``, and copies just the
selected samples' bytes (read + write of each run of neighbouring samples). Every run reads from
the page cache (one warm-up pass first). Throughput is input bytes per second:

* export, and the selected-bytes copy: sum of the selected samples' ``loc_size`` (their tar blocks);
* shard copy: the size of the copied shards (a plain copy reads and writes every byte once).

Prints the median of each and the ratios export/copy (target >= 0.5). Nothing is written outside
the temporary directory (``--tmp`` to choose where it is made).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dataprune.export import ExportConfig, export
from dataprune.ids import unit_random
from dataprune.manifest import build_manifest
from dataprune.tables import read_manifest, write_parquet_atomic

MB = 1e6


def make_selection(data: str, work: str, frac: float, seed: int) -> tuple[str, list[str], int, int]:
    """Manifest of ``frac`` of the samples of DATA/train-*.tar; returns (path, shard files, rows, bytes)."""
    shards = sorted(glob.glob(os.path.join(data, "train-*.tar")))
    if not shards:
        sys.exit(f"{data}: no train-*.tar shards")
    full = os.path.join(work, "all.parquet")
    build_manifest(data, full)
    table, meta = read_manifest(full)
    names = pa.array(sorted(os.path.basename(s) for s in shards))
    in_train = pc.is_in(pc.cast(table.column("shard"), pa.string()), value_set=names)
    draw = pa.array(unit_random(table.column("sample_id").to_numpy(), seed) < frac)
    kept = table.filter(pc.and_(in_train, draw))
    meta = dict(meta, selection={"strategy": "bench-random", "frac": frac, "seed": seed}, rows=kept.num_rows)
    path = os.path.join(work, "manifest.parquet")
    write_parquet_atomic(kept, path, meta)
    nbytes = int(pc.sum(kept.column("loc_size")).as_py())
    return path, shards, kept.num_rows, nbytes


def run_export(manifest: str, out: str, shuffle: bool, seed: int) -> tuple[float, dict]:
    if os.path.exists(out):
        shutil.rmtree(out)
    t = time.perf_counter()
    r = export(manifest, ExportConfig(to="wds", out=out, shuffle=shuffle, seed=seed))
    return time.perf_counter() - t, r


def selected_runs(manifest: str) -> list[tuple[str, list[tuple[int, int]]]]:
    """The selected samples' byte ranges per shard, neighbours merged: what a plain copy of exactly
    the bytes the export reads would read."""
    t = pq.read_table(manifest, columns=["loc_path", "loc_offset", "loc_size"])
    t = t.set_column(0, "loc_path", pc.cast(t.column("loc_path"), pa.string()))
    t = t.sort_by([("loc_path", "ascending"), ("loc_offset", "ascending")])
    out: dict[str, list[tuple[int, int]]] = {}
    for path, off, size in zip(*(t.column(c).to_pylist() for c in ("loc_path", "loc_offset", "loc_size"))):
        runs = out.setdefault(path, [])
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1] = (runs[-1][0], runs[-1][1] + size)
        else:
            runs.append((off, size))
    return sorted(out.items())


def run_copy_selected(runs, out: str) -> float:
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    t = time.perf_counter()
    for path, rs in runs:
        with open(path, "rb") as src, open(os.path.join(out, os.path.basename(path)), "wb") as dst:
            for off, size in rs:
                src.seek(off)
                dst.write(src.read(size))
    return time.perf_counter() - t


def run_copy(shards: list[str], out: str) -> float:
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    t = time.perf_counter()
    for s in shards:
        with open(s, "rb") as src, open(os.path.join(out, os.path.basename(s)), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="dataset directory holding train-*.tar (e.g. ../shared/data/cifar10)")
    ap.add_argument("--frac", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="where to make the temporary directory (default: system temp)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dataprune-bench-", dir=a.tmp) as work:
        t = time.perf_counter()
        manifest, shards, rows, sel_bytes = make_selection(a.data, work, a.frac, a.seed)
        copy_bytes = sum(os.path.getsize(s) for s in shards)
        print(f"selection: {rows} samples, {sel_bytes / MB:.1f} MB of {len(shards)} shards ({copy_bytes / MB:.1f} MB); "
              f"manifest in {time.perf_counter() - t:.2f} s")
        runs = selected_runs(manifest)
        # warm-up: page cache for the inputs, imports, first-call costs
        run_copy(shards, os.path.join(work, "copy"))
        run_export(manifest, os.path.join(work, "export"), False, a.seed)
        exp, shuf, cp, cps = [], [], [], []
        for i in range(a.repeats):
            te, r = run_export(manifest, os.path.join(work, "export"), False, a.seed)
            ts, rs = run_export(manifest, os.path.join(work, "export"), True, a.seed)
            tc = run_copy(shards, os.path.join(work, "copy"))
            tcs = run_copy_selected(runs, os.path.join(work, "copy"))
            assert r["samples"] == rows and rs["samples"] == rows and not r["skipped"], (r["samples"], r["skipped"])
            exp.append(sel_bytes / MB / te)
            shuf.append(sel_bytes / MB / ts)
            cp.append(copy_bytes / MB / tc)
            cps.append(sel_bytes / MB / tcs)
            print(f"run {i + 1}: export {exp[-1]:7.1f} MB/s ({te:.3f} s; read {r['seconds']['read']:.3f} s) | "
                  f"--shuffle {shuf[-1]:7.1f} MB/s ({ts:.3f} s) | copy shards {cp[-1]:7.1f} MB/s ({tc:.3f} s) | "
                  f"copy selected bytes {cps[-1]:7.1f} MB/s ({tcs:.3f} s)")
        e, s, c, cs = (statistics.median(x) for x in (exp, shuf, cp, cps))
        print(f"median of {a.repeats}: export {e:.1f} MB/s, export --shuffle {s:.1f} MB/s; "
              f"plain copy of the shards (shutil.copyfileobj) {c:.1f} MB/s, "
              f"plain copy of the selected samples' bytes (read+write) {cs:.1f} MB/s")
        print(f"ratio export/copy = {e / c:.2f} (vs selected bytes: {e / cs:.2f})   "
              f"ratio shuffle/copy = {s / c:.2f} (vs selected bytes: {s / cs:.2f})   (target >= 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
