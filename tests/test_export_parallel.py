"""Parallel export (issue 17): ``--jobs N`` workers and torchrun ranks write the output parts
``≡ k (mod N)`` and the output — every file, ``index.json`` included — is the same bytes for any N;
a worker or rank that dies is a clear error and the rerun completes; the kernel-copy route
(``copy_file_range``, ``sendfile``, ``pread``/``write``) writes exactly what the other routes write."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.demo import make_demo
from dataprune.export import ExportConfig, export, fastpath, kcopy
from dataprune.export.fastpath import _FastPath
from dataprune.export.outdir import STAGE
from dataprune.manifest import build_manifest
from dataprune.tables import read_manifest, write_parquet_atomic

ENV = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200", OMP_NUM_THREADS="1")


def tree(d) -> dict[str, str]:
    """sha256 of every file under ``d`` (relative path -> digest)."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataprune.cli", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """240 demo samples in 4 shards, a 70 % manifest of them with two rows that fail (a stale
    location, a location outside its file), so skips and their messages must come out in order."""
    root = tmp_path_factory.mktemp("par")
    make_demo(str(root / "data"), n=240, shard_size=60, image_size=8, seed=3)
    full = str(root / "all.parquet")
    build_manifest(str(root / "data"), full)
    t, meta = read_manifest(full)
    keep = np.random.default_rng(0).random(t.num_rows) < 0.7
    t = t.filter(pa.array(keep))
    off = t.column("loc_offset").to_numpy().copy()
    off[5] += 512  # stale: the member header is not where the manifest says
    off[100] = 10**9  # beyond the end of its file
    t = t.set_column(t.schema.get_field_index("loc_offset"), "loc_offset", pa.array(off))
    m = str(root / "m.parquet")
    write_parquet_atomic(t, m, meta)
    return root, m, t.num_rows - 2


CASES = [
    ("wds", {"shard_size": 7}),
    ("wds", {"shuffle": True, "seed": 4}),  # default shard sizes: 16 balanced parts
    ("wds", {"shard_size": 40, "max_shard_bytes": 20_000}),  # parts cut into several files by bytes
    ("parquet", {"shard_size": 9, "shuffle": True, "seed": 1}),
]


@pytest.mark.parametrize("to,kw", CASES)
def test_jobs_give_the_same_bytes(data, tmp_path, to, kw):
    root, m, good = data
    trees = []
    for jobs in (1, 2, 3):
        out = tmp_path / f"j{jobs}"
        r = export(m, ExportConfig(to=to, out=str(out), jobs=jobs, **kw))
        assert r["samples"] == good and sum(r["skipped"].values()) == 2 and len(r["errors"]) == 2
        trees.append(tree(out))
    assert trees[0] == trees[1] == trees[2]
    assert len(trees[0]) >= 4


def test_whole_dataset_jobs_match_the_single_stream(data, tmp_path):
    """A dataset (not a manifest): one process streams it, several list it first; the same bytes."""
    root, _, _ = data
    one, three = tmp_path / "one", tmp_path / "three"
    export(str(root / "data"), ExportConfig(out=str(one), jobs=1))
    r = export(str(root / "data"), ExportConfig(out=str(three), jobs=3))
    assert r["samples"] == 240 and len(r["files"]) == 16
    assert tree(one) == tree(three)


def test_whole_dataset_with_bad_samples_same_bytes_and_messages(data, tmp_path):
    """Skips found while reading (a symlink member) and while writing (an unsafe key) interleave in
    index.json's messages exactly as one streaming process meets them."""
    root, _, _ = data
    d = tmp_path / "in"
    shutil.copytree(root / "data", d)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for i, key in enumerate(["z0", "z1", "bad\x7fkey", "z2", "link", "z3", "z4"]):
            if key == "link":
                ti = tarfile.TarInfo("link.jpg")
                ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
                t.addfile(ti)
                continue
            for ext, payload in (("jpg", b"\xff\xd8" + bytes([i]) * 700), ("cls", b"1")):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(payload)
                t.addfile(ti, io.BytesIO(payload))
    (d / "demo-000001b.tar").write_bytes(buf.getvalue())  # between two demo shards in source order
    trees, errors = [], []
    for jobs in (1, 3):
        r = export(str(d), ExportConfig(out=str(tmp_path / f"o{jobs}"), shard_size=9, jobs=jobs))
        trees.append(tree(tmp_path / f"o{jobs}"))
        errors.append(r["errors"])
    assert len(errors[0]) == 2 and r["skipped"].get("unsafe_name") == 1, r["skipped"]
    assert errors[0] == errors[1] and trees[0] == trees[1]


def test_jobs_auto_forks_by_the_selected_bytes_and_cpus_and_changes_no_byte(data, tmp_path, monkeypatch):
    """``--jobs auto`` (the CLI's default, jobs=0): one process for a small selection, one per
    AUTO_BYTES of selected samples up to the usable CPUs otherwise — the same bytes either way; the
    writers that cannot split stay alone without a note; a whole dataset stays in one process."""
    from dataprune.export import parallel

    root, m, good = data
    ref = tmp_path / "ref"
    export(m, ExportConfig(out=str(ref), jobs=1))
    p = cli("export", m, "--out", tmp_path / "cli", "--json", "--allow-missing")  # no --jobs: auto
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["processes"] == 1  # the demo's ~100 KB: not worth a fork
    assert tree(tmp_path / "cli") == tree(ref)
    monkeypatch.setattr(parallel, "AUTO_BYTES", 1)  # any selection is big enough now
    r = export(m, ExportConfig(out=str(tmp_path / "auto"), jobs=0))
    assert r["processes"] == min(parallel.usable_cpus(), parallel.AUTO_MAX) and r["samples"] == good
    assert tree(tmp_path / "auto") == tree(ref)
    r = export(m, ExportConfig(to="list", out=str(tmp_path / "list"), jobs=0))
    assert r["processes"] == 1 and not any("one process" in n for n in r["notes"])
    r = export(str(root / "data"), ExportConfig(out=str(tmp_path / "whole"), jobs=0))
    assert r["processes"] == 1 and r["samples"] == 240
    monkeypatch.setattr(parallel, "usable_cpus", lambda: 1)  # a container or taskset leaving one CPU
    assert export(m, ExportConfig(out=str(tmp_path / "one"), jobs=0))["processes"] == 1
    assert tree(tmp_path / "one") == tree(ref)
    for bad in ("0", "-2", "two", "257"):
        q = cli("export", m, "--out", tmp_path / "bad", "--jobs", bad)
        assert q.returncode == 2 and "Traceback" not in q.stderr, q.stderr
        assert f"--jobs must be auto or a whole number from 1 to 256, not {bad!r}" in q.stderr, q.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("files, cpus", [
    ({"cpu.max": "200000 100000\n"}, 2.0),  # cgroup v2: docker --cpus 2
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),  # unlimited
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "lots 0\n"}, None),  # unreadable: no limit assumed
    ({}, None),
])
def test_cgroup_cpu_quota_bounds_the_usable_cpus(tmp_path, monkeypatch, files, cpus):
    """A Kubernetes CPU limit or ``docker --cpus`` leaves the affinity mask whole: the quota read
    from the cgroup files bounds ``--jobs auto`` too (rounded up, at least 1)."""
    from dataprune import distributed

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert distributed.cgroup_cpus(str(tmp_path)) == cpus
    monkeypatch.setattr(distributed, "CGROUP_ROOT", str(tmp_path))
    mask = len(os.sched_getaffinity(0))
    assert distributed.usable_cpus() == (mask if cpus is None else min(mask, max(1, int(np.ceil(cpus)))))


def test_writers_that_stay_single_process_say_so(data, tmp_path):
    root, m, good = data
    p = cli("export", m, "--to", "list", "--out", tmp_path / "l2", "--jobs", "2", "--allow-missing")
    assert p.returncode == 0, p.stderr
    assert "note: the 'list' writer runs in one process" in p.stderr
    export(m, ExportConfig(to="list", out=str(tmp_path / "l1")))
    assert tree(tmp_path / "l1") == tree(tmp_path / "l2")


def _kill_while_writing(args, out, pick, timeout, children):
    """Run ``args`` and SIGKILL the child process ``pick(children)`` chooses once a shard is being written."""
    p = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline and killed is None:
        stage = out / STAGE
        if stage.is_dir() and any(n.endswith(".tar.tmp") for n in os.listdir(stage)):
            killed = pick(children(p.pid))
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.002)
    _, err = p.communicate(timeout=timeout)
    return p, killed, err


def _rank_one(kids):
    """The torchrun child with RANK=1 in its environment, or None."""
    for kid in kids:
        try:
            env = open(f"/proc/{kid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"RANK=1" in env:
            return kid
    return None


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """3000 tiny samples: with --shard-size 1 an export writes 3000 files (long enough to kill)."""
    root = tmp_path_factory.mktemp("many")
    make_demo(str(root / "data"), n=3000, shard_size=750, image_size=8, seed=1)
    build_manifest(str(root / "data"), str(root / "m.parquet"))
    return root


def test_killed_job_is_a_clear_error_and_the_rerun_completes(many, tmp_path, children):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "dataprune.cli", "export", str(many / "m.parquet"), "--out", str(out), "--shard-size", "1",
            "--jobs", "2"]
    p, killed, err = _kill_while_writing(args, out, lambda kids: kids[-1] if kids else None, 60, children)
    assert killed is not None, "the export finished before a job could be killed"
    assert p.returncode == 1, err
    last = err.rstrip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: export job ") and "was killed by signal 9" in last, err
    assert "nothing was published" in last
    assert not (out / "index.json").exists() and not (out / STAGE).exists()
    r = cli("export", many / "m.parquet", "--out", out, "--shard-size", "1", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    export(str(many / "m.parquet"), ExportConfig(out=str(ref), shard_size=1))
    assert tree(out) == tree(ref)


def _torchrun(n: int, port: int, *args) -> list[str]:
    """torchrun of ``export`` on a free port (``port`` is only a hint, so that runs of this suite
    side by side, or other suites' torchrun tests, never meet on one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(port), "-m",
            "dataprune.cli", "export", *map(str, args)]


def test_torchrun_ranks_give_the_same_bytes(data, tmp_path):
    root, m, good = data
    export(m, ExportConfig(out=str(tmp_path / "one"), shard_size=7))
    p = subprocess.run(_torchrun(2, 29631, m, "--out", tmp_path / "two", "--shard-size", 7, "--allow-missing"), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count(f"exported {good} samples") == 1  # rank 0 reports, once
    export(str(root / "data"), ExportConfig(out=str(tmp_path / "whole1"), to="parquet"))
    p = subprocess.run(_torchrun(3, 29632, root / "data", "--out", tmp_path / "whole3", "--to", "parquet"), env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert tree(tmp_path / "one") == tree(tmp_path / "two")
    assert tree(tmp_path / "whole1") == tree(tmp_path / "whole3")
    assert json.loads((tmp_path / "whole3" / "index.json").read_text())["samples"] == 240


def test_torchrun_rank_killed_mid_export_then_rerun(many, tmp_path, children):
    out = tmp_path / "out"
    args = _torchrun(2, 29633, many / "m.parquet", "--out", out, "--shard-size", 1)
    p, killed, err = _kill_while_writing(args, out, _rank_one, 120, children)
    assert killed is not None, "the export finished before rank 1 could be killed"
    assert p.returncode != 0
    # torchrun stops rank 0 (SIGTERM: at most our one line — none when the signal lands before our
    # handler is installed, e.g. while rank 0 still imports —, never a traceback of ours) and names the dead rank
    ours = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(ours) <= 1 and all("interrupted" in ln or "export rank" in ln for ln in ours), err[-3000:]
    assert "/dataprune/" not in err, err[-3000:]
    assert "exitcode  : -9" in err and "rank      : 1" in err, err[-3000:]
    assert not (out / "index.json").exists()
    r = subprocess.run(_torchrun(2, 0, many / "m.parquet", "--out", out, "--shard-size", 1), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = tmp_path / "ref"
    export(str(many / "m.parquet"), ExportConfig(out=str(ref), shard_size=1))
    assert tree(out) == tree(ref)


# ------------------------------------------------------------------------------------ kernel copy

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """ImageNet-size samples (random bytes named .jpg, 40-150 KB; some with a text member), packed by
    tarfile with a foreign mode, owner and mtime (headers to normalise) and junk in one padding."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(5)
    os.makedirs(root / "in")
    for s in range(2):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            for i in range(30):
                members = [("jpg", rng.bytes(int(rng.integers(40_000, 150_000)))), ("cls", str(i % 7).encode())]
                if i % 4 == 0:
                    members.insert(1, ("txt", b"x" * int(rng.integers(1, 3000))))
                for ext, payload in members:
                    ti = tarfile.TarInfo(f"s{s}_{i:04d}.{ext}")
                    ti.size, ti.mtime, ti.mode, ti.uname = len(payload), 1_700_000_000, 0o644, "someone"
                    t.addfile(ti, io.BytesIO(payload))
        raw = bytearray(buf.getvalue())
        size0 = int(raw[124:135], 8)  # the first jpg
        if s == 1 and 0 < size0 % 512 <= 508:
            raw[512 + size0 : 516 + size0] = b"JUNK"  # non-zero padding after it
        (root / "in" / f"part-{s:06d}.tar").write_bytes(bytes(raw))
    build_manifest(str(root / "in"), str(root / "m.parquet"))
    return root


def test_kernel_copy_and_its_fallbacks_write_the_same_bytes(big, tmp_path, monkeypatch):
    m = str(big / "m.parquet")
    routes = []
    real = kcopy.batch
    monkeypatch.setattr(kcopy, "batch", lambda *a: routes.append("kernel") or real(*a))
    monkeypatch.setattr(fastpath, "KERNEL_MIN", kcopy.BIG)  # these 40-150 KB samples take the kernel route
    trees = {}
    for method in ("copy_file_range", "sendfile", "readwrite"):
        monkeypatch.setenv("DATAPRUNE_COPY", method)
        export(m, ExportConfig(out=str(tmp_path / method), shard_size=11, jobs=2 if method == "sendfile" else 1))
        trees[method] = tree(tmp_path / method)
    monkeypatch.delenv("DATAPRUNE_COPY")
    assert routes and set(routes) == {"kernel"}  # (counted in this process: the readwrite and copy_file_range runs)
    monkeypatch.setattr(fastpath, "KERNEL_MIN", 1 << 40)  # the vectorised route (buffers) instead
    export(m, ExportConfig(out=str(tmp_path / "buffers"), shard_size=11))
    monkeypatch.setattr(_FastPath, "_batch", lambda self, *a: False)  # ... and the per-sample writer
    export(m, ExportConfig(out=str(tmp_path / "slow"), shard_size=11))
    trees["buffers"], trees["slow"] = tree(tmp_path / "buffers"), tree(tmp_path / "slow")
    first = trees["slow"]
    assert all(t == first for t in trees.values()), {k: len(v) for k, v in trees.items()}
    with tarfile.open(tmp_path / "slow" / "pruned-000000.tar") as t:  # normalised headers, the data unchanged
        ms = t.getmembers()
        assert {(x.mode, x.mtime, x.uname) for x in ms} == {(0o444, 0, "")}
        assert len(t.extractfile(ms[0]).read()) == ms[0].size


def test_runs_with_normalised_headers_go_out_in_one_kernel_copy(big, tmp_path, monkeypatch):
    """Input whose headers need no rewrite (an export of ours): a run of neighbouring samples is one
    kernel copy, and the bytes are the per-sample writer's."""
    first = tmp_path / "first"
    export(str(big / "m.parquet"), ExportConfig(out=str(first), shard_size=100))
    m = str(tmp_path / "again.parquet")
    build_manifest(str(first), m)
    calls = []
    real = kcopy.copy_range
    monkeypatch.setattr(kcopy, "copy_range", lambda *a: calls.append(a[3]) or real(*a))
    monkeypatch.setattr(fastpath, "KERNEL_MIN", kcopy.BIG)
    export(m, ExportConfig(out=str(tmp_path / "kernel"), shard_size=100))
    assert 1 <= len(calls) <= 4 and sum(calls) > 0.9 * sum(os.path.getsize(first / f) for f in os.listdir(first) if f.endswith(".tar"))
    monkeypatch.setattr(_FastPath, "_batch", lambda self, *a: False)
    monkeypatch.setattr(kcopy, "batch", lambda *a: False)
    export(m, ExportConfig(out=str(tmp_path / "slow"), shard_size=100))
    assert tree(tmp_path / "kernel") == tree(tmp_path / "slow")
    assert tree(tmp_path / "slow")["pruned-000000.tar"] == tree(first)["pruned-000000.tar"]  # an export of an export: the same shard


def test_kernel_copy_refused_method_falls_back(tmp_path, monkeypatch):
    """A method the kernel refuses (here: copy_file_range between a file and a pipe) is dropped and
    the next one copies the range."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(200_000))
    r, w = os.pipe()
    monkeypatch.setattr(kcopy, "_dropped", set())
    try:
        with open(src, "rb") as f:
            import threading

            got = bytearray()
            th = threading.Thread(target=lambda: got.extend(_read_all(r)))
            th.start()
            kcopy.copy_range(f.fileno(), w, 1000, 150_000)
            os.close(w)
            th.join()
    finally:
        os.close(r)
    assert bytes(got) == src.read_bytes()[1000:151_000]
    assert kcopy._dropped == {"copy_file_range"}  # refused (EINVAL: not a regular file), then sendfile copied it


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def test_parquet_parts_read_back_in_order(data, tmp_path):
    """The parquet files of a parallel export hold the rows in output order, numbered of the total."""
    _, m, good = data
    r = export(m, ExportConfig(to="parquet", out=str(tmp_path / "p"), shard_size=50, jobs=3))
    names = [f["name"] for f in r["files"]]
    assert names == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    keys = [k for n in names for k in pq.read_table(tmp_path / "p" / n, columns=["key"]).column("key").to_pylist()]
    assert len(keys) == r["samples"] == good
