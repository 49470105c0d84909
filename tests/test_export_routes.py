"""The WebDataset export's routes (issue 17's speed work) write the same bytes: the vectorised buffers
(small and large batches), the kernel route with each ``DATAPRUNE_COPY`` method, the per-sample writer,
and ``--jobs 2`` — on input whose runs of selected samples cross input-shard and output-shard
boundaries, with headers that need no rewrite beside ones that do; and the export command starts
without the heavy libraries it does not use."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pytest

from dataprune import tarwrite
from dataprune.export import ExportConfig, export, fastpath, kcopy
from dataprune.export.fastpath import _FastPath
from dataprune.manifest import build_manifest
from dataprune.tables import read_manifest, write_parquet_atomic

ENV = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _member(name: str, data: bytes, foreign: bool, junk_padding: bool = False) -> bytes:
    """One tar member: our normalised header, or a packer's (mode, owner, mtime: rewritten on export)."""
    if foreign:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname = len(data), 1_700_000_000, 0o644, "packer"
        head = ti.tobuf(tarfile.USTAR_FORMAT)
    else:
        head = tarwrite.member_header(name, len(data))
    pad = tarwrite.padding(len(data))
    if junk_padding and pad:
        pad = b"J" + pad[1:]
    return head + data + pad


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """3 input shards of 40 samples (a .jpg of 30-90 KB or of 0.3-3 KB, a .cls, some a .txt); most
    headers are normalised, every 9th sample's are a packer's, one has non-zero padding. The manifest
    keeps ~75 % of the samples, always the last of each shard and the first of the next (runs that
    cross input shards)."""
    root = tmp_path_factory.mktemp("routes")
    rng = np.random.default_rng(11)
    os.makedirs(root / "in")
    for s in range(3):
        blob = []
        for i in range(40):
            big = rng.random() < 0.6
            jpg = rng.bytes(int(rng.integers(30_000, 90_000) if big else rng.integers(300, 3000)))
            foreign = (s * 40 + i) % 9 == 4
            key = f"s{s}_{i:04d}"
            blob.append(_member(f"{key}.jpg", jpg, foreign, junk_padding=(s, i) == (1, 7)))
            if i % 5 == 0:
                blob.append(_member(f"{key}.txt", b"t" * int(rng.integers(1, 700)), foreign))
            blob.append(_member(f"{key}.cls", str(i % 4).encode(), foreign))
        body = b"".join(blob)
        (root / "in" / f"part-{s:06d}.tar").write_bytes(body + tarwrite.end_of_archive(len(body)))
    full = str(root / "all.parquet")
    build_manifest(str(root / "in"), full)
    t, meta = read_manifest(full)
    keys = t.column("key").to_pylist()
    keep = np.random.default_rng(2).random(t.num_rows) < 0.75
    for k in ("s0_0039", "s1_0000", "s1_0039", "s2_0000", "s1_0006", "s1_0007", "s1_0008"):
        keep[keys.index(k)] = True
    t = t.filter(pa.array(keep))
    m = str(root / "m.parquet")
    write_parquet_atomic(t, m, dict(meta, rows=t.num_rows))
    return m


def _routes(monkeypatch, counts):
    real_batch, real_kernel = _FastPath._batch, kcopy.batch

    def vec(self, *a):
        ok = real_batch(self, *a)
        counts["buffers"] += ok
        return ok

    def kern(*a):
        ok = real_kernel(*a)
        counts["kernel"] += ok
        return ok

    monkeypatch.setattr(_FastPath, "_batch", vec)
    monkeypatch.setattr(kcopy, "batch", kern)


@pytest.mark.parametrize("shard_size", [7, 1000])
def test_every_route_writes_the_same_bytes(mixed, tmp_path, monkeypatch, shard_size, mk):
    counts = {"buffers": 0, "kernel": 0}
    _routes(monkeypatch, counts)
    trees = {}

    def run(name, jobs=1):
        out = tmp_path / name
        export(mixed, ExportConfig(out=str(out), shard_size=shard_size, jobs=jobs))
        trees[name] = mk.digest(out)

    run("default")
    assert counts["buffers"] and not counts["kernel"]  # 30-90 KB samples: the buffers, in large batches
    monkeypatch.setattr(fastpath, "_MICRO", 8 << 10)
    monkeypatch.setattr(fastpath, "_MICRO_LARGE", 8 << 10)
    run("small batches")
    monkeypatch.setattr(fastpath, "KERNEL_MIN", 0)  # every batch by the kernel route
    for method in ("copy_file_range", "sendfile", "readwrite"):
        monkeypatch.setenv("DATAPRUNE_COPY", method)
        before = counts["kernel"]
        run(method)
        assert counts["kernel"] > before
    monkeypatch.delenv("DATAPRUNE_COPY")
    run("kernel, 2 jobs", jobs=2)
    monkeypatch.setattr(fastpath, "KERNEL_MIN", 1 << 40)
    run("buffers, 2 jobs", jobs=2)
    monkeypatch.setattr(_FastPath, "_batch", lambda self, *a: False)
    monkeypatch.setattr(kcopy, "batch", lambda *a: False)
    run("per-sample")
    first = trees["per-sample"]
    assert len(first) > (2 if shard_size == 1000 else 10)
    assert all(t == first for t in trees.values()), [k for k, t in trees.items() if t != first]
    with tarfile.open(tmp_path / "per-sample" / "pruned-000000.tar") as t:  # all headers normalised, data unchanged
        ms = t.getmembers()
        assert {(x.mode, x.mtime, x.uname) for x in ms} == {(0o444, 0, "")}


def test_large_samples_take_the_kernel_route(tmp_path, monkeypatch, mk):
    """Samples of a MB and more go by the kernel route (no buffer holds them); a run of neighbours whose
    headers need no rewrite is one copy, the rewritten one in the middle splits it; same bytes."""
    rng = np.random.default_rng(4)
    os.makedirs(tmp_path / "in")
    blob = [_member(f"k{i}.{ext}", data, foreign=i == 2) for i in range(5)
            for ext, data in (("jpg", rng.bytes(fastpath.KERNEL_MIN + 1000 * i)), ("cls", b"1"))]
    body = b"".join(blob)
    (tmp_path / "in" / "a.tar").write_bytes(body + tarwrite.end_of_archive(len(body)))
    m = str(tmp_path / "m.parquet")
    build_manifest(str(tmp_path / "in"), m)
    counts = {"buffers": 0, "kernel": 0}
    _routes(monkeypatch, counts)
    calls = []
    real = kcopy.copy_range
    monkeypatch.setattr(kcopy, "copy_range", lambda *a: calls.append(a[3]) or real(*a))
    export(m, ExportConfig(out=str(tmp_path / "kernel"), shard_size=100))
    assert counts == {"buffers": 0, "kernel": 1}
    assert 2 <= len(calls) <= 4 and sum(calls) > 5 * fastpath.KERNEL_MIN  # runs before and after the rewritten header
    monkeypatch.setattr(fastpath, "KERNEL_MIN", 1 << 40)
    export(m, ExportConfig(out=str(tmp_path / "buffers"), shard_size=100))
    assert counts["buffers"] == 1
    assert mk.digest(tmp_path / "kernel") == mk.digest(tmp_path / "buffers")


HEAVY = ("torch", "timm", "pandas", "torchvision", "matplotlib", "PIL")


@pytest.mark.parametrize("rows", ["all", "none"])
def test_export_command_imports_no_heavy_library(mixed, tmp_path, rows):
    """The export command (start-up is most of a small export's time) never imports torch, timm, pandas
    (pyarrow's to_numpy / pa.array / read_table would), matplotlib or PIL."""
    m = mixed
    if rows == "none":
        t, meta = read_manifest(mixed)
        m = str(tmp_path / "empty.parquet")
        write_parquet_atomic(t.slice(0, 0), m, dict(meta, rows=0))
    code = ("import sys\nfrom dataprune.cli import main\n"
            f"sys.argv = ['dataprune', 'export', {m!r}, '--out', {str(tmp_path / 'out')!r}, '--json', '--allow-missing']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            f"print(sorted(x for x in {HEAVY!r} if x in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-500:]
    assert os.path.exists(tmp_path / "out" / "index.json")
