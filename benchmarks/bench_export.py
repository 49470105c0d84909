"""Export throughput beside ``cat`` of the same input to the same filesystem, measured in the same run.

    python benchmarks/bench_export.py [DATA ...] [--imagenet 10000] [--cifar-mb 3000] [--frac 0.8] [--repeats 3]

Datasets (each a directory of ``*.tar`` shards): every DATA given (e.g. the real CIFAR-10 shards,
``../shared/data/cifar10`` — read where they are, never copied), plus generated ones in the temporary
directory: ``--imagenet N`` samples of ImageNet size (a random-byte ``.jpg`` of 60–160 KB, ~110 KB
on average, and a ``.cls``; they need not decode) and ``--cifar-mb MB`` of CIFAR-size samples
(~900-byte ``.jpg`` + ``.cls``: 2.5 KB of tar blocks each), enough bytes that the command's start
(printed first: ``export --help`` and an export of an empty manifest, whole commands) is not the
whole story — the sets this is for are TBs. Headers are tarfile's with a foreign mode, owner and
mtime, so the export rewrites every one (``--imagenet-normalised``: headers needing no rewrite).
Disk: about 3 × the largest dataset in the temporary directory at a time (input, ``cat``'s copy,
the export), removed as it goes.

The commands run with Python's bytecode cache (in the temporary directory, through
``PYTHONPYCACHEPREFIX``), as an installed package has it, even where the shell sets
``PYTHONDONTWRITEBYTECODE`` (compiling dataprune's modules at every start costs ~0.1 s);
``--no-bytecode-cache`` runs them as the shell would.

For each dataset a seeded ``--frac`` of the samples is selected (a manifest made with pyarrow), then
``--repeats`` times, interleaved: ``cat`` of all its shards into one file, and the **whole command**
``python -m dataprune export MANIFEST --out DIR --jobs J`` for J = 1 and 2 and without ``--jobs`` (the
default, auto: on 2 cores 2 processes above 64 MB of selected samples), each in a subprocess,
into the same temporary directory, and ``export()`` called in this process (no interpreter start). Input is in the page cache (one warm-up pass of each first).
Throughput is input bytes per second: ``cat`` reads and writes every shard byte; the export reads
the selected samples' tar blocks (``loc_size``). Printed: medians, the ratio export / cat (targets
≥ 0.5 on CIFAR-size samples, ≥ 0.8 on ImageNet-size ones) and the load (``os.getloadavg``) before
and after. Nothing is written outside the temporary directory (``--tmp`` chooses where it is made).
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import resource
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dataprune.export import ExportConfig, export
from dataprune.ids import unit_random
from dataprune.manifest import build_manifest
from dataprune.tables import read_manifest, write_parquet_atomic

MB = 1e6


def generate(root: str, n: int, low: int, high: int, per_shard: int, seed: int, normal: bool = False) -> str:
    """``n`` samples (random-byte .jpg of [low, high) bytes and a .cls) in shards of ``per_shard``;
    ``normal``: with the headers an export writes (nothing to rewrite), else a packer's."""
    os.makedirs(root)
    rng = np.random.default_rng(seed)
    for s in range(0, n, per_shard):
        with tarfile.open(os.path.join(root, f"train-{s // per_shard:06d}.tar"), "w", format=tarfile.USTAR_FORMAT) as t:
            for i in range(s, min(n, s + per_shard)):
                for ext, data in (("jpg", rng.bytes(int(rng.integers(low, high)))), ("cls", str(i % 1000).encode())):
                    ti = tarfile.TarInfo(f"{i:08d}.{ext}")
                    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 1_700_000_000, 0o644, "packer", "packer"
                    if normal:
                        ti.mtime, ti.mode, ti.uname, ti.gname = 0, 0o444, "", ""
                    t.addfile(ti, io.BytesIO(data))
    return root


def make_selection(data: str, work: str, frac: float, seed: int) -> tuple[str, list[str], int, int]:
    """Manifest of ``frac`` of the samples of DATA/*.tar; returns (path, shard files, rows, bytes)."""
    shards = sorted(glob.glob(os.path.join(data, "*.tar")))
    if not shards:
        sys.exit(f"{data}: no *.tar shards")
    full = os.path.join(work, "all.parquet")
    build_manifest(data, full)
    table, meta = read_manifest(full)
    kept = table.filter(pa.array(unit_random(table.column("sample_id").to_numpy(), seed) < frac))
    meta = dict(meta, selection={"strategy": "bench-random", "frac": frac, "seed": seed}, rows=kept.num_rows)
    path = os.path.join(work, "manifest.parquet")
    write_parquet_atomic(kept, path, meta)
    return path, shards, kept.num_rows, int(pc.sum(kept.column("loc_size")).as_py())


CPU: dict[str, list[float]] = {}  # CPU seconds (user + system) of each timed command, by label


def timed(cmd: list[str], stdout=None, label: str = "") -> float:
    """Wall seconds of ``cmd``; its CPU seconds go to ``CPU[label]`` (a measure the load skews less).
    Dirty pages of earlier runs are flushed first (``os.sync``, not timed), so no command pays for the
    writeback of another's output (measured: the same command at 530-2190 MB/s without it)."""
    os.sync()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=stdout or subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(label, []).append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
    return wall


def run_cat(shards: list[str], out: str) -> float:
    with open(out, "wb") as f:
        return timed(["cat", *shards], stdout=f, label="cat")


def run_export(manifest: str, out: str, jobs: int | None) -> float:
    """The whole command with ``--jobs jobs``; None: without the option (the default, auto)."""
    if os.path.exists(out):
        shutil.rmtree(out)
    return timed([sys.executable, "-m", "dataprune", "export", manifest, "--out", out, "--json"]
                 + (["--jobs", str(jobs)] if jobs else []), label=f"jobs {jobs}" if jobs else "default")


def startup(work: str, data: str, repeats: int) -> None:
    """The command's fixed cost, whole commands as timed below: ``export --help`` and an export of an
    empty manifest (made from the first rows' metadata of ``data``: nothing to copy)."""
    sub = os.path.join(work, "w-startup")
    os.makedirs(sub)
    full = os.path.join(sub, "all.parquet")
    build_manifest(data, full)
    table, meta = read_manifest(full)
    empty = os.path.join(sub, "empty.parquet")
    write_parquet_atomic(table.slice(0, 0), empty, dict(meta, rows=0))
    out = os.path.join(sub, "out")
    helps, empties = [], []
    for _ in range(max(repeats, 3)):
        helps.append(timed([sys.executable, "-m", "dataprune", "export", "--help"], label="help"))
        empties.append(run_export(empty, out, 1))
    shutil.rmtree(sub)
    print(f"start-up (whole command, median of {len(helps)}): `export --help` {statistics.median(helps):.3f} s, "
          f"export of an empty manifest {statistics.median(empties):.3f} s; `python -c pass` "
          f"{statistics.median([timed([sys.executable, '-c', 'pass']) for _ in range(3)]):.3f} s")


def run_library(manifest: str, out: str) -> float:
    """``export()`` called in this process: the export without the interpreter's start and imports."""
    if os.path.exists(out):
        shutil.rmtree(out)
    os.sync()  # as timed() does
    t = time.perf_counter()
    export(manifest, ExportConfig(out=out))
    return time.perf_counter() - t


def bench(name: str, data: str, work: str, a) -> None:
    t = time.perf_counter()
    manifest, shards, rows, sel = make_selection(data, work, a.frac, a.seed)
    total = sum(os.path.getsize(s) for s in shards)
    print(f"\n{name}: {rows} of the samples selected ({sel / MB:.1f} MB of tar blocks, {sel / max(rows, 1) / 1e3:.1f} KB each) "
          f"from {len(shards)} shards ({total / MB:.1f} MB); manifest in {time.perf_counter() - t:.1f} s")
    cat_out, out = os.path.join(work, "cat.out"), os.path.join(work, "export")
    run_cat(shards, cat_out)  # warm-up: page cache, imports
    run_export(manifest, out, 1)
    res: dict[str, list[float]] = {"cat": [], "jobs 1": [], "jobs 2": [], "default": [], "library": []}
    CPU.clear()
    for i in range(a.repeats):
        res["cat"].append(total / MB / run_cat(shards, cat_out))
        for j in (1, 2, None):
            res[f"jobs {j}" if j else "default"].append(sel / MB / run_export(manifest, out, j))
        res["library"].append(sel / MB / run_library(manifest, out))
        print(f"  run {i + 1}: " + " | ".join(f"{k} {v[-1]:7.1f} MB/s" for k, v in res.items()) + f"  (load {os.getloadavg()[0]:.1f})")
    med = {k: statistics.median(v) for k, v in res.items()}
    cpu = {k: statistics.median(v) for k, v in CPU.items()}
    print(f"  median of {a.repeats}: cat {med['cat']:.1f} MB/s; whole export command --jobs 1 {med['jobs 1']:.1f} MB/s "
          f"(ratio {med['jobs 1'] / med['cat']:.2f}), --jobs 2 {med['jobs 2']:.1f} MB/s (ratio {med['jobs 2'] / med['cat']:.2f}); "
          f"export() in-process {med['library']:.1f} MB/s (ratio {med['library'] / med['cat']:.2f})")
    paired = {k: statistics.median([x / c for x, c in zip(res[k], res["cat"])]) for k in ("jobs 1", "jobs 2", "default", "library")}
    print(f"  median of the per-run ratios to that run's cat: --jobs 1 {paired['jobs 1']:.2f}, --jobs 2 {paired['jobs 2']:.2f}, "
          f"default (--jobs auto) {paired['default']:.2f}, in-process {paired['library']:.2f} "
          "(targets: 0.5 CIFAR-size, 0.8 ImageNet-size)")
    print(f"  CPU seconds (user + system, median): cat {cpu['cat']:.2f}, export --jobs 1 {cpu['jobs 1']:.2f}, "
          f"--jobs 2 {cpu['jobs 2']:.2f} (all processes)")
    os.unlink(cat_out)
    shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="*", help="dataset directories of *.tar shards (e.g. ../shared/data/cifar10)")
    ap.add_argument("--imagenet", type=int, default=10000, help="generated ImageNet-size samples (0: none)")
    ap.add_argument("--cifar-mb", type=int, default=3000, help="MB of generated CIFAR-size samples (0: none)")
    ap.add_argument("--imagenet-normalised", type=int, default=0,
                    help="generated ImageNet-size samples whose headers need no rewrite (runs go out in one kernel copy)")
    ap.add_argument("--frac", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="where to make the temporary directory (default: system temp)")
    ap.add_argument("--no-bytecode-cache", action="store_true", help="run the commands with this shell's bytecode setting")
    a = ap.parse_args(argv)
    print(f"load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory(prefix="dataprune-bench-", dir=a.tmp) as work:
        if not a.no_bytecode_cache:
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
            os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(work, "pycache")
        print(f"bytecode cache: {'as this shell has it' if a.no_bytecode_cache else 'on (PYTHONPYCACHEPREFIX in the temporary directory)'}")
        first = a.data[0] if a.data else generate(os.path.join(work, "data-startup"), 10, 1000, 2000, 10, a.seed)
        timed([sys.executable, "-m", "dataprune", "export", "--help"])  # warm-up (writes the bytecode cache)
        startup(work, first, a.repeats)
        if not a.data:
            shutil.rmtree(first)
        for d in a.data:
            sub = os.path.join(work, "w-" + os.path.basename(os.path.abspath(d)))
            os.makedirs(sub)
            bench(d, d, sub, a)
        for name, n, low, high, per, normal in (("ImageNet-size (generated)", a.imagenet, 60_000, 160_000, 1000, False),
                                                 ("ImageNet-size, normalised headers (generated)", a.imagenet_normalised, 60_000,
                                                  160_000, 1000, True),
                                                 ("CIFAR-size (generated)", a.cifar_mb * 400, 700, 1100, 10_000, False)):
            if n:
                t = time.perf_counter()
                d = generate(os.path.join(work, f"data-{len(name)}"), n, low, high, per, a.seed, normal)
                print(f"\n(generated {n} samples in {time.perf_counter() - t:.1f} s)")
                sub = os.path.join(work, "w-" + os.path.basename(d))
                os.makedirs(sub)
                bench(name, d, sub, a)
                shutil.rmtree(d)
    print(f"\nload after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
