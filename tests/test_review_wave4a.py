"""Review of ``dataprune export --jobs auto`` (the CLI's default): hostile manifests, shard plans
with fewer parts than processes, interrupts of an auto-forked export, the option's spellings and a
platform without fork(). The output must be the bytes of ``--jobs 1`` in every case."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pytest

from dataprune.demo import make_demo
from dataprune.export import ExportConfig, export, parallel
from dataprune.export.outdir import STAGE
from dataprune.manifest import build_manifest
from dataprune.tables import read_manifest, write_parquet_atomic

ENV = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200", OMP_NUM_THREADS="1")
BIG = 40 << 20  # two samples of this size make the selection worth two processes (AUTO_BYTES = 64 MB)
TWO = min(parallel.usable_cpus(), parallel.AUTO_MAX, 2)  # what auto picks for the big fixture
needs_two = pytest.mark.skipif(TWO < 2, reason="auto forks only where two CPUs are usable")


def tree(d) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataprune.cli", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _sparse_tar(path, members) -> None:
    """A tar whose big members are holes (no disk, no time), read back as zeros."""
    with open(path, "wb") as f:
        for name, size, payload in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = size, 0o644
            f.write(ti.tobuf(format=tarfile.USTAR_FORMAT))
            if payload is None:
                f.seek(size + (-size % 512), 1)
            else:
                f.write(payload + b"\0" * (-size % 512))
        f.write(b"\0" * 1024)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """1500 tiny demo samples plus two 40 MB ones: ~80 MB selected, so ``--jobs auto`` forks."""
    root = tmp_path_factory.mktemp("auto")
    make_demo(str(root / "data"), n=1500, shard_size=750, image_size=8, seed=1)
    _sparse_tar(root / "data" / "demo-000009.tar", [("big0.jpg", BIG, None), ("big0.cls", 1, b"1"),
                                                      ("big1.jpg", BIG, None), ("big1.cls", 1, b"2")])
    m = root / "m.parquet"
    build_manifest(str(root / "data"), str(m))
    return root, m


@pytest.fixture(scope="module")
def ref(big, tmp_path_factory):
    """``--jobs 1`` exports of the big manifest, by shard plan."""
    root, m = big
    cache = {}

    def get(**kw):
        key = tuple(sorted(kw.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("ref")
            export(str(m), ExportConfig(out=str(out / "o"), jobs=1, **kw))
            cache[key] = tree(out / "o")
        return cache[key]

    return get


def _with_rows(src, dst, sizes: list[int]) -> str:
    """``src``'s manifest plus rows copied from its first, with these ``loc_size`` values."""
    t, meta = read_manifest(str(src))
    extra = t.slice(0, len(sizes))
    extra = extra.set_column(extra.schema.get_field_index("loc_size"), "loc_size", pa.array(sizes, pa.int64()))
    keys = [f"evil{i}" for i in range(len(sizes))]
    extra = extra.set_column(extra.schema.get_field_index("key"), "key", pa.array(keys, extra.schema.field("key").type))
    write_parquet_atomic(pa.concat_tables([t, extra]), str(dst), meta)
    return str(dst)


# ----------------------------------------------------------------------------- bytes and decisions

@pytest.mark.parametrize("kw,procs", [
    ({}, TWO),
    ({"shuffle": True, "seed": 3}, TWO),
    ({"to": "parquet", "shard_size": 300}, TWO),
    ({"shard_size": 50, "max_shard_bytes": 4096}, TWO),
    ({"shard_size": 100_000}, 1),  # one output part: a second process would have nothing to write
])
def test_auto_picks_by_bytes_and_parts_and_changes_no_byte(big, ref, tmp_path, kw, procs):
    _, m = big
    r = export(str(m), ExportConfig(out=str(tmp_path / "o"), jobs=0, **kw))
    assert r["processes"] == procs and r["samples"] == 1502
    assert "processes" not in json.loads((tmp_path / "o" / "index.json").read_text())
    assert tree(tmp_path / "o") == ref(**kw)


def test_auto_counts_only_the_rows_it_exports(big, tmp_path):
    """Rows the export skips as unusable (a loc_size above 4 GiB: ``bad_location``) must not make
    auto fork: here no row is exported at all, yet their claimed sizes are summed."""
    root, m = big
    t, meta = read_manifest(str(m))
    t = t.slice(0, 5)
    t = t.set_column(t.schema.get_field_index("loc_size"), "loc_size", pa.array([1 << 40] * 5, pa.int64()))
    evil = str(tmp_path / "evil.parquet")
    write_parquet_atomic(t, evil, meta)
    r = export(evil, ExportConfig(out=str(tmp_path / "o"), jobs=0))
    export(evil, ExportConfig(out=str(tmp_path / "one"), jobs=1))
    assert r["samples"] == 0 and r["skipped"] == {"bad_location": 5}
    assert tree(tmp_path / "o") == tree(tmp_path / "one")
    assert r["processes"] == 1, "auto forked workers for rows that are all skipped"


def test_auto_bytes_sum_does_not_wrap(big, ref, tmp_path):
    """Two skipped rows claiming 2**62 bytes each wrap the int64 sum to a negative number, so the
    80 MB of real samples next to them are exported by one process."""
    _, m = big
    evil = _with_rows(m, tmp_path / "wrap.parquet", [1 << 62, 1 << 62])
    r = export(evil, ExportConfig(out=str(tmp_path / "o"), jobs=0))
    one = export(evil, ExportConfig(out=str(tmp_path / "one"), jobs=1))
    assert r["samples"] == one["samples"] == 1502 and r["skipped"] == {"bad_location": 2}
    assert tree(tmp_path / "o") == tree(tmp_path / "one")
    assert r["processes"] == TWO, "the loc_size sum wrapped around"


def test_empty_and_null_sizes_stay_in_one_process(big, tmp_path):
    root, m = big
    t, meta = read_manifest(str(m))
    empty = str(tmp_path / "empty.parquet")
    write_parquet_atomic(t.slice(0, 0), empty, meta)
    r = export(empty, ExportConfig(out=str(tmp_path / "e"), jobs=0))
    assert r["processes"] == 1 and r["samples"] == 0
    nulls = t.slice(0, 20)
    nulls = nulls.set_column(nulls.schema.get_field_index("loc_size"), "loc_size", pa.nulls(20, pa.int64()))
    np_ = str(tmp_path / "nulls.parquet")
    write_parquet_atomic(nulls, np_, meta)
    r = export(np_, ExportConfig(out=str(tmp_path / "n"), jobs=0))
    assert r["processes"] == 1 and r["skipped"] == {"bad_location": 20}


def test_auto_without_fork_stays_in_one_process(big, ref, tmp_path, monkeypatch):
    _, m = big
    monkeypatch.setattr(parallel.mp, "get_all_start_methods", lambda: ["spawn"])
    r = export(str(m), ExportConfig(out=str(tmp_path / "o"), jobs=0))
    assert r["processes"] == 1 and tree(tmp_path / "o") == ref()


def test_progress_counts_every_sample_once_with_forked_workers(big, tmp_path):
    _, m = big
    seen = [0, 0]

    def progress(n, b):
        seen[0] += n
        seen[1] += b

    r = export(str(m), ExportConfig(out=str(tmp_path / "o"), jobs=0), progress=progress)
    assert r["processes"] == TWO and seen == [r["samples"], r["bytes"]], (seen, r["samples"], r["bytes"])


# ------------------------------------------------------------------------------------------- CLI

def test_cli_default_forks_and_reports_it(big, ref, tmp_path):
    _, m = big
    p = cli("export", m, "--out", tmp_path / "j", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["processes"] == TWO and tree(tmp_path / "j") == ref()
    p = cli("export", m, "--out", tmp_path / "t")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    if TWO > 1:
        assert f"({TWO} processes)" in p.stdout, p.stdout
    assert tree(tmp_path / "t") == ref()


@needs_two
def test_cli_progress_bar_on_a_terminal_with_forked_workers(big, tmp_path):
    """On a terminal (a pty) the bar counts the workers' samples to the total, once."""
    import pty
    import select

    _, m = big
    mfd, sfd = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "dataprune.cli", "export", str(m), "--out", str(tmp_path / "o")],
                         stdin=sfd, stdout=sfd, stderr=sfd, env=dict(ENV, TERM="xterm"), close_fds=True)
    os.close(sfd)
    buf = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([mfd], [], [], 0.1)[0]:
            try:
                chunk = os.read(mfd, 1 << 16)
            except OSError:  # the pty's other end closed
                break
            if not chunk:
                break
            buf += chunk
        elif p.poll() is not None:
            break
    os.close(mfd)
    assert p.wait(timeout=30) == 0, buf[-2000:]
    text = buf.decode("utf-8", "replace")
    assert "Traceback" not in text and "1502/?" in text and "exported 1502 samples" in text, text[-2000:]
    assert f"({TWO} processes)" in text and "1503/?" not in text and "3004/?" not in text, text[-2000:]


def test_cli_auto_fork_with_skips_exits_8_with_the_same_output(big, tmp_path):
    _, m = big
    evil = _with_rows(m, tmp_path / "skip.parquet", [-5])
    p = cli("export", evil, "--out", tmp_path / "a")
    assert p.returncode == 8, p.stderr
    assert "Traceback" not in p.stderr
    q = cli("export", evil, "--out", tmp_path / "b", "--jobs", "1")
    assert q.returncode == 8, q.stderr
    assert tree(tmp_path / "a") == tree(tmp_path / "b") and (tmp_path / "a" / "index.json").exists()


def test_cli_auto_fork_on_error_raise_is_the_same_error(big, tmp_path):
    """--on-error raise and a stale row: the same exit code and message as one process (the user
    asked for no jobs), nothing published."""
    _, m = big
    t, meta = read_manifest(str(m))
    off = t.column("loc_offset").to_pylist()
    off[700] += 512  # the member header is not where the manifest says
    t = t.set_column(t.schema.get_field_index("loc_offset"), "loc_offset", pa.array(off, pa.int64()))
    stale = str(tmp_path / "stale.parquet")
    write_parquet_atomic(t, stale, meta)
    a = cli("export", stale, "--out", tmp_path / "a", "--on-error", "raise", "--json")
    b = cli("export", stale, "--out", tmp_path / "b", "--on-error", "raise", "--jobs", "1")
    assert a.returncode == b.returncode != 0 and "Traceback" not in a.stderr, (a.stderr, b.stderr)
    la, lb = a.stderr.strip().splitlines()[-1], b.stderr.strip().splitlines()[-1]
    assert lb.removeprefix("error: ") in la, (la, lb)
    assert not (tmp_path / "a" / "index.json").exists() and not (tmp_path / "a" / STAGE).exists()


@pytest.mark.parametrize("text,ok", [(" auto ", True), ("AUTO", True), (" 2 ", True), ("1.5", False), ("", False),
                                     ("0", False), ("9999", False)])
def test_cli_jobs_spellings(big, tmp_path, text, ok):
    _, m = big
    p = cli("export", m, "--out", tmp_path / "o", "--jobs", text, "--json")
    if ok:
        assert p.returncode == 0, p.stderr
        return
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    # every refusal names the values that work: a CLI user cannot give 0 (auto is spelled "auto")
    assert "auto" in last and "[0," not in last, last
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- interrupts

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _writers(names) -> set[int]:
    """The workers (part mod TWO) with a file being written: ``.pruned-PPPPPP-0000.tar.tmp``."""
    return {int(n.split("-")[1]) % TWO for n in names if n.startswith(".pruned-") and n.endswith(".tmp")}


def _frozen_mid_export(m, out, children, writing: bool = True) -> tuple[subprocess.Popen, list[int]]:
    """An auto-forked export whose workers are stopped (SIGSTOP) while they write (``writing``), or
    the moment they exist (still in multiprocessing's start-up, before the worker code runs)."""
    p = subprocess.Popen([sys.executable, "-m", "dataprune.cli", "export", str(m), "--out", str(out), "--shard-size", "1"],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        kids = children(p.pid)
        stage = out / STAGE
        busy = not writing or (stage.is_dir() and _writers(os.listdir(stage)) == set(range(TWO)))
        if len(kids) >= TWO and busy:
            for k in kids:
                os.kill(k, signal.SIGSTOP)
            return p, kids
        time.sleep(0.0005)
    p.kill()
    pytest.fail("the export never had its workers running side by side")


def _rerun_completes(big, ref, out) -> None:
    _, m = big
    r = cli("export", m, "--out", out, "--shard-size", 1)
    assert r.returncode == 0, r.stderr
    assert tree(out) == ref(shard_size=1)


def _interrupt(p, kids, how) -> str:
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground group
    else:
        os.kill(p.pid, signal.SIGTERM)  # a CI runner's stop: the parent only
    for k in kids:
        os.kill(k, signal.SIGCONT)
    _, err = p.communicate(timeout=60)
    return err


def _check_stopped(p, kids, err, out, tmp_path) -> None:
    assert p.returncode == 130, (p.returncode, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert not (out / "index.json").exists() and not (out / STAGE).exists()
    assert not any(_alive(k) for k in kids)
    assert all(n.startswith("out") for n in os.listdir(tmp_path)), os.listdir(tmp_path)


@needs_two
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_auto_fork_is_one_line_and_the_rerun_completes(big, ref, tmp_path, how, children):
    """Ctrl-C or SIGTERM while the forked workers write: exit 130, one line, nothing published."""
    _, m = big
    out = tmp_path / "out"
    p, kids = _frozen_mid_export(m, out, children)
    _check_stopped(p, kids, _interrupt(p, kids, how), out, tmp_path)
    _rerun_completes(big, ref, out)


@needs_two
def test_stop_signal_while_the_workers_are_forked_is_honoured_without_traceback(big, tmp_path, children):
    """Ctrl-C / SIGTERM landing while fork() runs (the parent's and the child's at-fork hooks, the
    child's multiprocessing start-up, before the worker's own try): the KeyboardInterrupt is
    dropped ("Exception ignored in _releaseLock" / "Finalize"), tracebacks reach stderr, and the
    export ends with exit 1 (a worker 'exited with status 1') or even exit 0, published after a
    SIGTERM. A race: three tries of each signal, all must be clean."""
    _, m = big
    for attempt in range(3):
        for how in ("ctrl-c", "sigterm"):
            out = tmp_path / f"out{attempt}{how}"
            p, kids = _frozen_mid_export(m, out, children, writing=False)
            _check_stopped(p, kids, _interrupt(p, kids, how), out, tmp_path)


@needs_two
@pytest.mark.parametrize("writing", [True, False])
def test_killed_parent_takes_its_workers_and_the_rerun_completes(big, ref, tmp_path, writing, children):
    """kill -9 of the export while its workers write, or the moment they were forked (before
    ``_die_with_parent`` ran): no worker outlives it, holding the lock or writing into --out."""
    _, m = big
    out = tmp_path / "out"
    p, kids = _frozen_mid_export(m, out, children, writing)
    stage = out / STAGE
    before = set(os.listdir(stage))
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    for k in kids:
        os.kill(k, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(k) for k in kids), "a worker outlived its killed parent"
    grown = set(os.listdir(stage)) - before if stage.is_dir() else set()
    assert not grown, f"orphaned workers went on writing {len(grown)} files into --out after their parent was killed"
    assert not (out / "index.json").exists()
    assert os.listdir(tmp_path) == ["out"]
    _rerun_completes(big, ref, out)
