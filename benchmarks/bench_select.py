"""Benchmark `dataprune select` on a generated score table (default 10,000,000 rows, 1,000 classes).

Measures, in the same run and on the same (page-cached) files:
  * the whole command as a user runs it — `dataprune select TABLE --keep hard --frac 0.8 --class-balanced
    --out M` in a fresh process (interpreter start, imports, read, choose, write the manifest) —
    beside the time pyarrow needs to read the columns (`pyarrow.dataset(...).to_table(columns)`, timed
    around that call only, also in a fresh process; each run pairs one of each): the decision columns
    (sample_id, label, status, el2n) always, and every column select reads (decision + manifest) up to
    --all-columns-max rows (above, that read alone would hold more memory than this benchmark may use;
    --streamed-read then times them read batch by batch, for information only);
  * the command's peak resident memory (the child's ru_maxrss);
  * the floor (--no-floor skips it): pyarrow alone, in a fresh process, doing the least an exact
    out-of-core select must — one streamed read of the decision columns, then a streamed copy of the
    kept rows' manifest columns in the manifest's encoding — and select ÷ that floor.
Targets: time ≤ 3× the read (of every column select reads when measured, else of the decision columns);
memory ≤ 2.5× the column bytes in memory, or ≤ 2 GB when select runs out of core (--memory-limit, or
by itself when the in-memory estimate exceeds half the RAM — 200M rows do). Prints medians of --runs runs.

    python benchmarks/bench_select.py [--rows 10000000] [--classes 1000] [--rows-per-part 100000] [--runs 3]
                                      [--memory-limit 500MB] [--streamed-read] [--keep-dir DIR] [--work-dir /tmp]

Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

TIME_TARGET = 3.0
MEM_TARGET = 2.5
STREAM_RSS_TARGET = 2e9  # bytes: the out-of-core select's peak
DECISION_COLUMNS = ["sample_id", "label", "status", "el2n"]
# every column `select --keep hard --class-balanced` reads (decision + manifest); `error` is not read
READ_COLUMNS = ["sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size", "status", "el2n"]


def make_table(out: str, rows: int, classes: int, per_part: int, seed: int = 0) -> None:
    from dataprune import scoretable, tables
    from dataprune.ids import mix64

    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    names = []
    for p, start in enumerate(range(0, rows, per_part)):
        n = min(per_part, rows - start)
        shard = f"train-{p:06d}.tar"
        names.append(shard)
        idx = np.arange(start, start + n, dtype=np.uint64)
        one = lambda s: pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([s]))  # noqa: E731
        st = (rng.random(n) < 0.001).astype(np.int32)  # 0.1 % of samples could not be scored
        arrays = [
            pa.array(mix64(idx, 12345), pa.uint64()),
            one(shard),
            pa.array(idx - np.uint64(start)).cast(pa.string()),
            pa.array(rng.integers(0, classes, n).astype(np.int32)),
            one(f"/data/imagenet/{shard}"),
            pa.array(np.arange(n, dtype=np.int64) * 115_200),
            pa.array(rng.integers(20_000, 200_000, n).astype(np.int64)),
            pa.DictionaryArray.from_arrays(pa.array(st), pa.array(["ok", "decode_error"])),
            pa.nulls(n, pa.string()),
            pa.array(rng.gamma(2.0, 0.2, n).astype(np.float32)),
        ]
        schema = pa.schema(list(tables.BASE_FIELDS) + [pa.field("el2n", pa.float32())])
        scoretable.write_part(out, p, pa.Table.from_arrays(arrays, schema=schema), {"seen": n})
    meta = scoretable.score_table_meta({"format": "wds", "path": "/data/imagenet", "options": {}},
                                   [f"n{i:08d}" for i in range(classes)], names, {"el2n": {"params": {"epochs": 10}}})
    scoretable.write_table_meta(out, meta)


_READER = """
import json, os, sys, time
import pyarrow.dataset as ds
files, columns, times, streamed = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
for _ in range(times):
    t = None
    t0, c0 = time.perf_counter(), time.process_time()
    if streamed:  # batch by batch, none kept: bounded memory at any size
        nbytes = sum(b.nbytes for b in ds.dataset(files, format="parquet").to_batches(columns=columns))
    else:
        t = ds.dataset(files, format="parquet").to_table(columns=columns)
        nbytes = t.nbytes
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps([wall, cpu, nbytes]))
"""


_FLOOR = """
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import pyarrow as pa, pyarrow.dataset as ds, pyarrow.parquet as pq
from dataprune.manifest import writer_options
files, decision, copy, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
t0 = time.perf_counter()
for b in ds.dataset(files, format="parquet").to_batches(columns=decision):  # the one pass a decision needs
    pass
t1 = time.perf_counter()
schema = ds.dataset(files[:1], format="parquet").schema
sch = pa.schema([schema.field(c) for c in copy])
writer = pq.ParquetWriter(out, sch, **writer_options(sch))
write = lambda ts: writer.write_table(pa.concat_tables(ts).unify_dictionaries(), row_group_size=1 << 20)
pending, n, busy = [], 0, None
with ThreadPoolExecutor(1) as bg:  # row groups are encoded on a thread while the next rows are read
    for b in ds.dataset(files, format="parquet").to_batches(columns=copy):  # the copy of the kept rows
        ids = b.column("sample_id").to_numpy()
        pending.append(pa.Table.from_batches([b]).filter(pa.array(ids % 5 != 0)))  # 80 % kept, spread evenly
        n += pending[-1].num_rows
        if n >= 1 << 20:
            busy = busy.result() if busy is not None else None
            busy, pending, n = bg.submit(write, pending), [], 0
    busy = busy.result() if busy is not None else None
if pending:
    write(pending)
writer.close()
print(json.dumps([t1 - t0, time.perf_counter() - t1]))
"""


def floor(table_dir: str, out: str) -> tuple[float, float]:
    """What pyarrow alone takes for the least an exact out-of-core select must do, in a new process:
    one streamed read of the decision columns (a cut is known only after every row was seen), then a
    streamed copy of the manifest's columns for 80 % of the rows, written with the manifest's own
    encoding (``manifest.writer_options``). Returns (read, copy) seconds. No decision is taken, so any
    select costs more; a time target below this sum cannot be met by any implementation."""
    import json

    from dataprune import scoretable

    files = [scoretable.part_path(table_dir, i) for i in sorted(scoretable.done_parts(table_dir))]
    copy = ["sample_id"] + [c for c in READ_COLUMNS if c not in ("sample_id", "status")]
    res = subprocess.run([sys.executable, "-c", _FLOOR, json.dumps(files), json.dumps(DECISION_COLUMNS[1:]), json.dumps(copy), out],
                         check=True, capture_output=True, text=True).stdout
    os.unlink(out)
    read, cp = json.loads(res)
    return read, cp


def read_columns(table_dir: str, warm: bool = False, columns: list[str] | None = None,
                 streamed: bool = False) -> tuple[float, float, int]:
    """Wall and CPU seconds (all threads) for pyarrow to read READ_COLUMNS of every part, and their
    bytes. In a new process like the user's command (only the read call is timed, not the imports),
    so both contenders start with cold allocators; ``warm``: the second of two reads in that process;
    ``streamed``: batch by batch, dropping each (to_batches), for tables too big to hold.
    (Also keeps this process small: a child's ru_maxrss starts from its parent's RSS at fork.)"""
    import json

    from dataprune import scoretable

    files = [scoretable.part_path(table_dir, i) for i in sorted(scoretable.done_parts(table_dir))]
    out = subprocess.run([sys.executable, "-c", _READER, json.dumps(files), json.dumps(columns or READ_COLUMNS), "2" if warm else "1",
                          "1" if streamed else "0"],
                         check=True, capture_output=True, text=True).stdout
    wall, cpu, nbytes = json.loads(out)
    return wall, cpu, nbytes


def run_select(table_dir: str, out: str, memory_limit: str | None = None) -> tuple[float, float, int, str]:
    exe = shutil.which("dataprune")
    cmd = ([exe] if exe else [sys.executable, "-m", "dataprune.cli"]) + [
        "select", table_dir, "--keep", "hard", "--frac", "0.8", "--class-balanced", "--out", out]
    cmd += ["--memory-limit", memory_limit] if memory_limit else []
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, COLUMNS="120"))
    output = p.stdout.read().decode()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        sys.exit(f"select failed ({p.returncode}):\n{output}")
    return dt, ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024, output


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--rows-per-part", type=int, default=100_000, help="rows per part (= per input shard)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory-limit", help="passed to select (e.g. 500MB forces the out-of-core path on 10M rows)")
    ap.add_argument("--all-columns-max", type=int, default=20_000_000,
                    help="largest table whose every column is also read as a reference")
    ap.add_argument("--streamed-read", action="store_true",
                    help="above --all-columns-max, also time a streamed read of every column select reads (for information)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="also time pyarrow alone doing the least an out-of-core select must (read the decision columns "
                         "once, copy the kept rows' manifest columns once); --no-floor skips it")
    ap.add_argument("--keep-dir", help="build the table here and keep it (reused when it already exists)")
    ap.add_argument("--work-dir", help="where the temporary table and manifest go (default: the system's temp dir)")
    ap.add_argument("--make-only", metavar="DIR", help=argparse.SUPPRESS)  # internal: build the table in a child
    args = ap.parse_args()
    if args.make_only:
        make_table(args.make_only, args.rows, args.classes, args.rows_per_part)
        return 0

    work = args.keep_dir or tempfile.mkdtemp(prefix="bench-select-", dir=args.work_dir)
    table_dir = os.path.join(work, "scores")
    try:
        from dataprune import tables

        if not (os.path.isdir(table_dir) and os.path.exists(os.path.join(table_dir, tables.META_FILE))):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--make-only", table_dir, "--rows", str(args.rows), "--classes",
                            str(args.classes), "--rows-per-part", str(args.rows_per_part)], check=True)
            print(f"built a {args.rows:,}-row score table ({args.classes} classes, "
                  f"{-(-args.rows // args.rows_per_part)} parts) in {time.perf_counter() - t0:.1f}s: {table_dir}")
        out = os.path.join(work, "manifest.parquet")
        full = args.rows <= args.all_columns_max
        read_columns(table_dir, columns=DECISION_COLUMNS)  # warm the page cache for both contenders
        if full:
            read_columns(table_dir)
        reads, dreads, times, scpu, peaks, ratios, dratios, floors = [], [], [], [], [], [], [], []
        col_bytes = dec_bytes = 0
        last = ""
        for i in range(args.runs):  # each run pairs the reads with one select, back to back
            dt, _, dec_bytes = read_columns(table_dir, columns=DECISION_COLUMNS)
            rt, _, col_bytes = read_columns(table_dir) if full else (float("nan"), 0.0, 0)
            if not full and args.streamed_read:  # for information: every column select reads, batch by batch
                rt = read_columns(table_dir, streamed=True)[0]
            st, sc, peak, last = run_select(table_dir, out, args.memory_limit)
            fr, fc = floor(table_dir, out + ".floor") if args.floor else (float("nan"), float("nan"))
            floors.append(fr + fc)
            dreads.append(dt)
            reads.append(rt)
            times.append(st)
            scpu.append(sc)
            peaks.append(peak)
            ratios.append(st / rt)
            dratios.append(st / dt)
            some = full or args.streamed_read
            print(f"run {i + 1}: pyarrow read: decision columns {dt:.2f}s" + (f", all {rt:.2f}s" if some else "")
                  + ("" if full or not some else " (streamed)")
                  + f" · select {st:.2f}s (cpu {sc:.2f}s) → {st / dt:.2f}× decision" + (f", {st / rt:.2f}× all" if some else "")
                  + f" · peak {peak / 1e6:.0f} MB"
                  + (f" · floor {fr:.2f}s + {fc:.2f}s (read + copy) → select {st / (fr + fc):.2f}× floor" if args.floor else ""),
                  flush=True)
        import pyarrow.parquet as pq

        kept = pq.ParquetFile(out).metadata.num_rows
        med = statistics.median
        streamed = "out of core" in last
        load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        print("\n" + "\n".join(ln for ln in last.strip().splitlines() if ln.startswith(("selection:", "wrote "))))
        print(f"\nmedians of {args.runs} runs · {args.rows:,} rows, {args.classes} classes · manifest {kept:,} rows · "
              f"select {'out of core' if streamed else 'in memory'} · {os.cpu_count()} CPUs, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
        tr = med(ratios) if full else med(dratios)
        what = f"every column select reads ({len(READ_COLUMNS)})" if full else f"the decision columns ({len(DECISION_COLUMNS)})"
        print(f"  time    select {med(times):7.2f} s  vs pyarrow read of the decision columns {med(dreads):6.2f} s → "
              f"{med(dratios):.2f}×" + (f"; of all {len(READ_COLUMNS)} columns {med(reads):6.2f} s → {med(ratios):.2f}×" if full else ""))
        if not full and args.streamed_read:
            print(f"          (for information: a streamed read — batch by batch, none kept — of all {len(READ_COLUMNS)} columns "
                  f"select reads {med(reads):6.2f} s → {med(ratios):.2f}×; not the target's reference)")
        print(f"          target: ≤ {TIME_TARGET}× the read of {what}: {tr:.2f}×  {'ok' if tr <= TIME_TARGET else 'MISSED'}")
        if args.floor:
            fl, ref = med(floors), med(reads) if full else med(dreads)  # the target's reference read
            print(f"  floor   pyarrow alone, one read of the decision columns + a copy of the kept rows' manifest columns "
                  f"(no decision): {fl:6.2f} s = {fl / ref:.2f}× the target's read ({'above' if fl / ref > TIME_TARGET else 'below'} "
                  f"the {TIME_TARGET}× target); select ÷ floor {med(t / f for t, f in zip(times, floors)):.2f}×")
        print(f"  cpu     select {med(scpu):7.2f} s (user+system, all threads)")
        if streamed:
            ok_mem = med(peaks) <= STREAM_RSS_TARGET
            print(f"  memory  select peak {med(peaks) / 1e6:6.0f} MB (target ≤ {STREAM_RSS_TARGET / 1e9:.0f} GB out of core)  "
                  f"{'ok' if ok_mem else 'MISSED'}; decision columns in memory would be {dec_bytes / 1e6:.0f} MB")
        else:
            mr = med(peaks) / (col_bytes or dec_bytes)
            ok_mem = mr <= MEM_TARGET
            print(f"  memory  select peak {med(peaks) / 1e6:6.0f} MB  vs bytes of those columns {(col_bytes or dec_bytes) / 1e6:6.0f} MB  "
                  f"→ {mr:.2f}× (target ≤ {MEM_TARGET}×)  {'ok' if ok_mem else 'MISSED'}")
        return 0 if tr <= TIME_TARGET and ok_mem else 1
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
