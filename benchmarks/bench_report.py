"""Benchmark `dataprune report` on a 1,000,000-row score table with 1,000 classes (bench_select's generator).

Measures, in the same run and on the same (page-cached) files:
  * the whole command as a user runs it — `dataprune report TABLE --manifest M --out R` in a fresh
    process (interpreter start, imports, read, every section, plots, thumbnails, the page) — and its
    peak resident memory (the child's ru_maxrss);
  * beside it, the time pyarrow needs to read the same columns (`pyarrow.dataset(...).to_table(columns)`,
    timed around that call only, in a fresh process).
The table's dataset (/data/imagenet) does not exist here, so the thumbnails are placeholders: the
benchmark measures the table work (distributions, per-class sorts, correlations, selection).
Limits (issue 15): ≤ 60 s and ≤ 2 GB RSS.

    python benchmarks/bench_report.py [--rows 1000000] [--classes 1000] [--rows-per-part 100000] [--runs 3] [--keep-dir DIR]

Exit status 1 if a limit is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

LIMIT_S, LIMIT_RSS = 60.0, 2 * 1024**3
HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size", "status", "error", "el2n"]

_READER = """
import json, sys, time
import pyarrow.dataset as ds
files, columns = json.loads(sys.argv[1]), json.loads(sys.argv[2])
t0 = time.perf_counter()
t = ds.dataset(files, format="parquet").to_table(columns=columns)
print(json.dumps([time.perf_counter() - t0, t.nbytes]))
"""


def _cli() -> list[str]:
    exe = shutil.which("dataprune")
    return [exe] if exe else [sys.executable, "-m", "dataprune.cli"]


def read_columns(table_dir: str) -> tuple[float, int]:
    from dataprune import scoretable

    files = [scoretable.part_path(table_dir, i) for i in sorted(scoretable.done_parts(table_dir))]
    out = subprocess.run([sys.executable, "-c", _READER, json.dumps(files), json.dumps(COLUMNS)], check=True,
                         capture_output=True, text=True).stdout
    wall, nbytes = json.loads(out)
    return wall, nbytes


def run(cmd: list[str]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="120"))
    output = p.stdout.read().decode()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"{' '.join(cmd)} failed:\n{output}")
    return dt, ru.ru_maxrss * 1024, output


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--rows-per-part", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep-dir", help="build the table here and keep it (reused when it already exists)")
    args = ap.parse_args()
    work = args.keep_dir or tempfile.mkdtemp(prefix="bench-report-")
    table_dir = os.path.join(work, "scores")
    try:
        from dataprune import tables

        if not os.path.exists(os.path.join(table_dir, tables.META_FILE)):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(HERE, "bench_select.py"), "--make-only", table_dir, "--rows", str(args.rows),
                            "--classes", str(args.classes), "--rows-per-part", str(args.rows_per_part)], check=True)
            print(f"built a {args.rows:,}-row score table ({args.classes} classes) in {time.perf_counter() - t0:.1f}s: {table_dir}")
        manifest = os.path.join(work, "manifest.parquet")
        if not os.path.exists(manifest):
            run(_cli() + ["select", table_dir, "--keep", "hard", "--frac", "0.8", "--class-balanced", "--out", manifest])
        read_columns(table_dir)  # warm the page cache
        times, rss, reads = [], [], []
        for i in range(args.runs):
            reads.append(read_columns(table_dir)[0])
            out = os.path.join(work, f"report-{i}")
            dt, mem, output = run(_cli() + ["report", table_dir, "--manifest", manifest, "--out", out])
            times.append(dt)
            rss.append(mem)
        nbytes = read_columns(table_dir)[1]
        t, m, r = statistics.median(times), max(rss), statistics.median(reads)
        load = os.getloadavg()
        print(output.strip().splitlines()[-2] if output.strip() else "")
        print(f"dataprune report, {args.rows:,} rows × {args.classes} classes, --manifest, median of {args.runs} "
              f"(load {load[0]:.1f} on {os.cpu_count()} cores):")
        print(f"  time      {t:6.1f} s   (limit {LIMIT_S:.0f} s; runs: {', '.join(f'{x:.1f}' for x in times)})")
        print(f"  peak RSS  {m / 2**20:6.0f} MiB (limit {LIMIT_RSS / 2**20:.0f} MiB)")
        print(f"  pyarrow reads the same {len(COLUMNS)} columns ({nbytes / 2**20:.0f} MiB in Arrow) in {r:.2f} s "
              f"→ report = {t / r:.1f}× the read")
        ok = t <= LIMIT_S and m <= LIMIT_RSS
        print("OK" if ok else "LIMIT MISSED")
        return 0 if ok else 1
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
