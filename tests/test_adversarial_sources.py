"""Hostile inputs on the sources side (issue 12), through the real CLI where a user meets them.

One test per mechanism: special files in image folders (FIFOs, sockets, devices, symlinks out of the
root, unreadable directories, undecodable names), locations from a hand-made manifest (outside the
dataset, through a symlink, absurd sizes and offsets, wrong keys), a parquet file with one corrupt
row group, labels and keys that are not what they claim, and checkpoints whose header lies about
its size. Every command runs with a timeout (a FIFO must never hang it), ends in its exit code and
at most one error line (never a traceback), and the good samples beside the bad ones survive.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import struct
import subprocess
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.errors import ConfigError, SourceError
from dataprune.ids import sample_id
from dataprune.sources import open_source

T = 60  # seconds: any command here takes a few; a hang fails the test instead of the suite


def run(mk, *args, ok=(0,)):
    try:
        r = mk.cli(*args, timeout=T)
    except subprocess.TimeoutExpired:
        pytest.fail(f"dataprune {' '.join(map(str, args))} hung (killed after {T} s)")
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert r.returncode in ok, (r.returncode, r.stdout[-2000:], r.stderr)
    if r.returncode not in (0, 8):
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line, naming what is wrong
    return r


def as_json(r) -> dict:
    return json.loads(r.stdout)


def regular_files(root) -> dict[str, bytes]:
    """relative path -> bytes of every file under ``root`` (asserting none is a symlink or special file)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            assert stat.S_ISREG(st.st_mode), f"{p} is not a regular file"
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def add_rows(manifest: str, out: str, rows: list[dict]) -> str:
    """A copy of ``manifest`` (metadata kept) with hand-made ``rows`` appended."""
    t = pq.read_table(manifest)
    for i, r in enumerate(rows):
        r.setdefault("label", 0)
        r.setdefault("sample_id", sample_id("hostile", f"{i}-{r['key']}"))
    pq.write_table(pa.concat_tables([t, pa.Table.from_pylist(rows, schema=t.schema)]), out)
    return out


def make_fifo(path) -> str:
    os.mkfifo(path)
    return str(path)


def make_socket(path) -> socket.socket:
    """A unix socket at ``path`` (bound through a relative name: socket paths are limited to ~100 bytes)."""
    here = os.getcwd()
    os.chdir(os.path.dirname(path))
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.path.basename(path))
    finally:
        os.chdir(here)  # the CLI subprocesses must import this checkout's dataprune (found from the cwd)
    return s


# ------------------------------------------------------------------------ 1. image folders

def test_folder_special_files_are_counted_never_opened(tmp_path, mk):
    root, outside = tmp_path / "ds", tmp_path / "outside"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    outside.mkdir()
    good = {"cat/a.jpg": mk.jpeg(1), "cat/b.jpg": mk.jpeg(2), "dog/c.jpg": mk.jpeg(3)}
    for rel, data in good.items():
        (root / rel).write_bytes(data)
    secret = mk.jpeg(99)
    (outside / "secret.jpg").write_bytes(secret)
    (outside / "more.jpg").write_bytes(secret)
    make_fifo(root / "cat" / "fifo.jpg")
    sock = make_socket(str(root / "cat" / "sock.jpg"))
    os.symlink("/dev/zero", root / "cat" / "zero.jpg")  # today: a MemoryError
    os.symlink(outside / "secret.jpg", root / "cat" / "out.jpg")  # a file symlink out of the root
    os.symlink(outside, root / "dog" / "escape")  # a directory symlink out of the root
    os.symlink("a.jpg", root / "cat" / "in.jpg")  # inside the root: followed
    with open(os.path.join(os.fsencode(root / "dog"), b"caf\xe9.jpg"), "wb") as f:  # not UTF-8
        f.write(mk.jpeg(4))
    try:
        r = as_json(run(mk, "info", root, "--check", "--json"))
        assert r["ok"] == 4 and r["samples"] == 10, r
        assert r["problems"] == {"not_regular_file": 3, "outside_root": 2, "unsafe_name": 1}, r["problems"]
        assert r["samples"] == r["ok"] + r["skipped"]
        text = " ".join(r["problem_examples"])
        assert "FIFO" in text and "socket" in text and "character device" in text and "escape" in text
        run(mk, "info", root, "--strict", ok=(6,))

        m = str(tmp_path / "m.parquet")
        run(mk, "manifest", root, "--out", m, ok=(0, 8))
        assert sorted(pq.read_table(m).column("key").to_pylist()) == ["cat/a", "cat/b", "cat/in", "dog/c"]

        out = tmp_path / "out"
        run(mk, "export", m, "--to", "folder", "--out", out, "--json", ok=(0, 8))
        files = regular_files(out)
        images = {k: v for k, v in files.items() if k.endswith(".jpg")}
        assert sorted(images.values()) == sorted([good["cat/a.jpg"], good["cat/b.jpg"], good["cat/a.jpg"], good["dog/c.jpg"]])
        assert secret not in images.values()
        whole = tmp_path / "whole"  # the dataset exported whole: the same samples, regular files only
        run(mk, "export", root, "--to", "folder", "--out", whole, ok=(0, 8))
        assert sorted(v for k, v in regular_files(whole).items() if k.endswith(".jpg")) == sorted(images.values())
    finally:
        sock.close()


def test_folder_unreadable_directory_is_counted(tmp_path, mk, monkeypatch):
    root = tmp_path / "ds"
    for rel, seed in (("cat/a.jpg", 1), ("dog/b.jpg", 2), ("dog/locked/c.jpg", 3)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(mk.jpeg(seed))
    locked = root / "dog" / "locked"
    if os.geteuid() != 0:  # a real permission error, through the CLI
        locked.chmod(0)
        try:
            r = as_json(run(mk, "info", root, "--json"))
        finally:
            locked.chmod(0o755)
    else:  # root reads everything: make os.walk's listing of that directory fail instead
        from dataprune.info import dataset_info

        real = os.scandir

        def scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(locked))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
        r = dataset_info(str(root))
    assert r["ok"] == 2 and r["problems"] == {"unreadable_dir": 1}, r
    assert any("locked" in e and "cannot be listed" in e for e in r["problem_examples"])


def test_special_shards_and_non_utf8_names(tmp_path, mk):
    d = tmp_path / "wds"
    mk.tar(d / "a.tar", mk.sample("g1", 1, mk.jpeg(1)) + mk.sample("g2", 2, mk.jpeg(2)))
    buf = io.BytesIO()  # a member name that is not UTF-8, beside a good sample
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tf:
        for name, data in (("ok.jpg", mk.jpeg(3)), ("ok.cls", b"1"), ("x\udcff.jpg", mk.jpeg(4))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (d / "b.tar").write_bytes(buf.getvalue())
    make_fifo(d / "c-fifo.tar")  # today: info, manifest and export hang here
    os.symlink("/dev/zero", d / "d-zero.tar")
    with open(os.path.join(os.fsencode(d), b"e-\xff.tar"), "wb") as f:
        f.write(mk.tar_bytes(mk.sample("z", 1, mk.jpeg(5))))
    r = as_json(run(mk, "info", d, "--check", "--json"))
    assert r["ok"] == 3 and r["problems"] == {"unsafe_name": 1}, r
    reasons = sorted(e["reason"] for e in r["shard_errors"])
    assert reasons == ["not_regular_file", "not_regular_file", "unsafe_name"], r["shard_errors"]
    m = str(tmp_path / "m.parquet")
    run(mk, "manifest", d, "--out", m, ok=(0, 8))
    assert pq.read_table(m).num_rows == 3
    r = run(mk, "info", make_fifo(tmp_path / "pipe"), ok=(3,))  # the dataset argument itself
    assert "FIFO" in r.stderr
    pdir = tmp_path / "pq"
    pdir.mkdir()
    mk.bytes_parquet(pdir / "a.parquet", [("k1", 1, mk.jpeg(1)), ("k2", 2, mk.jpeg(2))])
    make_fifo(pdir / "b.parquet")
    r = as_json(run(mk, "info", pdir, "--json"))
    assert r["ok"] == 2 and [e["reason"] for e in r["shard_errors"]] == ["not_regular_file"]


def test_oversized_members_are_never_held(tmp_path, mk, monkeypatch):
    """A member claiming more than tario.MAX_MEMBER (a gzip bomb) is read through, never held."""
    from dataprune import tario

    monkeypatch.setattr(tario, "MAX_MEMBER", 1 << 16)
    big = bytes(1 << 18)
    for gz in (False, True):
        p = mk.tar(tmp_path / f"d{gz}" / ("a.tar.gz" if gz else "a.tar"),
                   mk.sample("g1", 1, mk.jpeg(1)) + [("bomb.jpg", big)] + mk.sample("g2", 2, mk.jpeg(2)), gz=gz)
        src = open_source(p)
        got = [s for sh in src.list_shards() for s in src.iter_samples(sh)]
        assert [(s.key, s.status) for s in got] == [("g1", "ok"), ("bomb", "too_large"), ("g2", "ok")]
        assert "bomb.jpg" in got[1].error and got[1].image is None


# ------------------------------------------------------------- 2. locations are untrusted

def wds_rows(tmp_path, mk):
    """A tar dataset, its manifest, a valid tar outside it, and a symlink into the dataset pointing at that tar."""
    d = tmp_path / "data"
    mk.tar(d / "a.tar", mk.sample("g1", 1, mk.jpeg(1)) + mk.sample("g2", 2, mk.jpeg(2)) + mk.sample("g3", 3, mk.jpeg(3)))
    mk.tar(d / "b.tar", mk.sample("h1", 4, mk.jpeg(4)) + mk.sample("h2", 5, mk.jpeg(5)))
    m = str(tmp_path / "m.parquet")
    run(mk, "manifest", d, "--out", m)
    secret = mk.jpeg(99, size=(16, 16))
    outside = mk.tar(tmp_path / "elsewhere" / "a.tar", mk.sample("g1", 1, secret))  # same names as a dataset shard
    os.symlink(outside, d / "link.tar")  # made after the manifest: a symlink out of the root
    make_fifo(d / "fifo.tar")
    rows = {r["key"]: r for r in pq.read_table(m).to_pylist()}
    return d, m, rows, secret, outside


def test_export_refuses_hostile_tar_locations(tmp_path, mk):
    d, m, rows, secret, outside = wds_rows(tmp_path, mk)
    a, size = str(d / "a.tar"), os.path.getsize(d / "a.tar")
    g2 = rows["g2"]
    hostile = [
        dict(shard="a.tar", key="p1", loc_path="/etc/passwd", loc_offset=0, loc_size=512),
        dict(shard="a.tar", key="g1", loc_path=outside, loc_offset=0, loc_size=rows["g1"]["loc_size"]),
        dict(shard="a.tar", key="g1", loc_path=str(d / "link.tar"), loc_offset=0, loc_size=rows["g1"]["loc_size"]),
        dict(shard="a.tar", key="g1", loc_path=str(d / ".." / "elsewhere" / "a.tar"), loc_offset=0, loc_size=1024),
        dict(shard="a.tar", key="f1", loc_path=str(d / "fifo.tar"), loc_offset=0, loc_size=512),
        dict(shard="a.tar", key="g2", loc_path=a, loc_offset=g2["loc_offset"], loc_size=-512),
        dict(shard="a.tar", key="g2", loc_path=a, loc_offset=g2["loc_offset"], loc_size=0),
        dict(shard="a.tar", key="g2", loc_path=a, loc_offset=g2["loc_offset"], loc_size=1 << 40),
        dict(shard="a.tar", key="g2", loc_path=a, loc_offset=size + 4096, loc_size=1024),
        dict(shard="a.tar", key="g2", loc_path=a, loc_offset=1 << 40, loc_size=1024),
        dict(shard="a.tar", key="g2", loc_path=a, loc_offset=g2["loc_offset"] + 512, loc_size=g2["loc_size"] - 512),
        dict(shard="a.tar", key="zz", loc_path=a, loc_offset=g2["loc_offset"], loc_size=g2["loc_size"]),  # not its key
    ]
    bad = add_rows(m, str(tmp_path / "bad.parquet"), hostile)
    for to in ("wds", "folder"):
        out = tmp_path / f"out-{to}"
        r = as_json(run(mk, "export", bad, "--to", to, "--out", out, "--json", ok=(0, 8)))
        assert r["samples"] == 5, r  # every good row survives
        assert sum(r["skipped"].values()) == len(hostile), r["skipped"]
        assert r["skipped"].get("outside_root", 0) >= 3 and r["skipped"].get("bad_location", 0) >= 3, r["skipped"]
        blob = b"".join(regular_files(out).values())
        assert secret not in blob and b"root:" not in blob
    got = {n for f in sorted((tmp_path / "out-wds").glob("pruned-*.tar")) for n in mk.read_tar(str(f))}
    assert sorted(n for n in got if n.endswith(".jpg")) == ["g1.jpg", "g2.jpg", "g3.jpg", "h1.jpg", "h2.jpg"]

    # the source itself, row by row: each bad row is its own error, never the whole shard's
    src = open_source(str(d))
    for row, reason in ((hostile[5], "bad_location"), (hostile[7], "bad_location"), (hostile[9], "truncated_tar"),
                        (hostile[11], "stale_location"), (hostile[0], "outside_root"), (hostile[2], "outside_root")):
        with pytest.raises(SourceError) as e:
            list(src.fetch(row["loc_path"], [(row["key"], row["loc_offset"], row["loc_size"])]))
        assert e.value.reason == reason and row["key"] in str(e.value) or reason == "outside_root", (row, e.value)
    assert src.contains(a) and not src.contains(str(d / "link.tar")) and not src.contains("/etc/passwd")

    one = add_rows(m, str(tmp_path / "one.parquet"), [dict(hostile[0])])  # --on-error raise: one line naming the row
    r = run(mk, "export", one, "--out", tmp_path / "out-raise", "--on-error", "raise", ok=(3,))
    assert "/etc/passwd" in r.stderr and "outside" in r.stderr
    assert not [f for f in os.listdir(tmp_path / "out-raise") if f.endswith(".tar")] if os.path.isdir(tmp_path / "out-raise") else True


def test_fast_path_reads_only_vetted_locations(tmp_path, mk, monkeypatch):
    """The vectorised wds -> wds copy applies the same checks before preadv / np.empty: a batch with a
    location outside the dataset or past the end of its file goes to the per-sample path whole."""
    from dataprune.export import fastpath
    from dataprune.export.base import ExportStats

    d, m, rows, secret, outside = wds_rows(tmp_path, mk)
    t = pq.read_table(m)
    a = str(d / "a.tar")

    class Sink:
        blocks = 0

        def add_block(self, keys, sizes, parts, emit):
            Sink.blocks += 1
            return True

    opened = []
    real_open = os.open
    monkeypatch.setattr(fastpath.os, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    src = open_source(str(d))

    def attempt(extra: list[dict], bind: bool = True) -> list[int]:
        table = pa.concat_tables([t, pa.Table.from_pylist([dict(sample_id=9, label=0, **r) for r in extra], schema=t.schema)])
        sub = table.select(["shard", "key", "label", "loc_path", "loc_offset", "loc_size"])
        sub = sub.append_column("part", pa.array(np.zeros(sub.num_rows, np.int64)))  # one output part
        fast = fastpath._FastPath(Sink(), ExportStats(), None, src if bind else None)
        sent = []
        fast.run(sub, lambda part: sent.append(part.num_rows))
        fast.close()
        return sent

    assert attempt([]) == [] and Sink.blocks == 1  # all good rows: the fast way
    assert attempt([], bind=False) == [5] and Sink.blocks == 1  # unbound: nothing is read the fast way
    for row in (dict(shard="a.tar", key="g1", loc_path=outside, loc_offset=0, loc_size=rows["g1"]["loc_size"]),
                dict(shard="a.tar", key="g1", loc_path=str(d / "link.tar"), loc_offset=0, loc_size=1024),
                dict(shard="a.tar", key="g2", loc_path=a, loc_offset=0, loc_size=1 << 40),
                dict(shard="a.tar", key="g2", loc_path=a, loc_offset=1 << 40, loc_size=1024),
                dict(shard="a.tar", key="g2", loc_path="/etc/passwd", loc_offset=0, loc_size=512),
                dict(shard="a.tar", key="g2", loc_path=str(d / "fifo.tar"), loc_offset=0, loc_size=512)):
        opened.clear()
        assert attempt([row]) == [6], row  # the whole batch, to the per-sample path (which reports the row)
        assert all(os.path.realpath(p).startswith(str(d.resolve())) and not p.endswith(("link.tar", "fifo.tar"))
                   for p in opened), opened


def test_export_refuses_hostile_folder_locations(tmp_path, mk):
    root = tmp_path / "ds"
    (root / "cat").mkdir(parents=True)
    for k in range(3):
        (root / "cat" / f"{k}.jpg").write_bytes(mk.jpeg(k))
    m = str(tmp_path / "m.parquet")
    run(mk, "manifest", root, "--out", m)
    secret = mk.jpeg(99, size=(16, 16))
    (tmp_path / "secret.jpg").write_bytes(secret)
    os.symlink(tmp_path / "secret.jpg", root / "cat" / "link.jpg")
    make_fifo(root / "cat" / "fifo.jpg")
    n = len(secret)
    passwd = os.path.getsize("/etc/passwd") if os.path.exists("/etc/passwd") else 100
    hostile = [
        dict(shard="folder-000000", key="cat/p", loc_path="/etc/passwd", loc_offset=0, loc_size=passwd),
        dict(shard="folder-000000", key="cat/s", loc_path=str(tmp_path / "secret.jpg"), loc_offset=0, loc_size=n),
        dict(shard="folder-000000", key="cat/link", loc_path=str(root / "cat" / "link.jpg"), loc_offset=0, loc_size=n),
        dict(shard="folder-000000", key="cat/up", loc_path=str(root / "cat" / ".." / ".." / "secret.jpg"), loc_offset=0,
             loc_size=n),
        dict(shard="folder-000000", key="cat/zero", loc_path="/dev/zero", loc_offset=0, loc_size=1 << 40),
        dict(shard="folder-000000", key="cat/fifo", loc_path=str(root / "cat" / "fifo.jpg"), loc_offset=0, loc_size=10),
        dict(shard="folder-000000", key="cat/0", loc_path=str(root / "cat" / "0.jpg"), loc_offset=0, loc_size=7),
    ]
    bad = add_rows(m, str(tmp_path / "bad.parquet"), hostile)
    for to in ("folder", "wds"):
        out = tmp_path / f"out-{to}"
        r = as_json(run(mk, "export", bad, "--to", to, "--out", out, "--json", ok=(0, 8)))
        assert r["samples"] == 3 and sum(r["skipped"].values()) == len(hostile), r
        files = regular_files(out)  # hard links or copies: regular files, never symlinks
        assert secret not in b"".join(files.values())
        if to == "folder":
            assert len([f for f in files if f.endswith(".jpg")]) == 3
            etc = os.stat("/etc/passwd").st_ino if os.path.exists("/etc/passwd") else -1
            assert all(os.stat(out / f).st_ino != etc for f in files)
    src = open_source(str(root))
    for row, reason in ((hostile[0], "outside_root"), (hostile[2], "outside_root"), (hostile[5], "not_regular_file"),
                        (hostile[6], "stale_location")):
        with pytest.raises(SourceError) as e:
            list(src.fetch(row["loc_path"], [(row["key"], row["loc_offset"], row["loc_size"])]))
        assert e.value.reason == reason, (row, e.value)


@pytest.mark.parametrize("fmt", ["folder", "wds"])
def test_a_manifest_claiming_the_whole_disk_as_its_root(tmp_path, mk, fmt):
    """The recorded root bounds what is read; even "/" gives only files that can be its samples."""
    d = tmp_path / "d"
    if fmt == "folder":
        (d / "cat").mkdir(parents=True)
        (d / "cat" / "a.jpg").write_bytes(mk.jpeg(1))
    else:
        mk.tar(d / "a.tar", mk.sample("a", 1, mk.jpeg(1)))
    m = str(tmp_path / "m.parquet")
    run(mk, "manifest", d, "--out", m)
    t = pq.read_table(m)
    meta = json.loads(t.schema.metadata[b"dataprune"])
    meta["source"] = {"format": fmt, "path": "/", "options": {}}
    passwd = os.path.getsize("/etc/passwd") if os.path.exists("/etc/passwd") else 512
    row = dict(sample_id=1, shard=t.column("shard")[0].as_py(), key="cat/p" if fmt == "folder" else "p", label=0,
               loc_path="/etc/passwd", loc_offset=0, loc_size=passwd if fmt == "folder" else 512)
    t = pa.concat_tables([t, pa.Table.from_pylist([row], schema=t.schema)])
    bad = str(tmp_path / "bad.parquet")
    pq.write_table(t.replace_schema_metadata({b"dataprune": json.dumps(meta).encode()}), bad)
    src = open_source("/", fmt)  # the source itself: /etc/passwd is no image, no tar shard
    assert not src.contains("/etc/passwd") and src.contains(str(d / ("cat/a.jpg" if fmt == "folder" else "a.tar")))
    with pytest.raises(SourceError) as e:
        list(src.fetch("/etc/passwd", [(row["key"], 0, row["loc_size"])]))
    assert e.value.reason == "outside_root"
    out = tmp_path / "out"
    r = run(mk, "export", bad, "--to", "folder", "--out", out, "--json", ok=(0, 2, 8))
    if r.returncode == 2:  # a folder rooted at "/" holds every --out: refused before anything is read
        assert "inside the input data" in r.stderr and not os.path.exists(out)
        return
    r = as_json(r)
    assert r["samples"] == 1 and r["skipped"] == {"outside_root": 1}, r
    assert b"root:" not in b"".join(regular_files(out).values())


def test_parquet_row_numbers_are_checked(tmp_path, mk):
    p = mk.bytes_parquet(tmp_path / "d.parquet", [(f"k{i}", i, mk.jpeg(i)) for i in range(5)])
    src = open_source(p)
    n = len(mk.jpeg(0))
    assert [f.key for f in src.fetch(p, [("k0", 0, n)])] == ["k0"]
    for row, size, reason in ((5, n, "stale_location"), (1 << 40, n, "stale_location"), (-1, n, "bad_location"),
                              (0, n + 1, "stale_location"), (0, -5, "bad_location")):
        with pytest.raises(SourceError) as e:
            list(src.fetch(p, [("k0", row, size)]))
        assert e.value.reason == reason and "k0" in str(e.value)
    with pytest.raises(SourceError) as e:
        list(src.fetch(str(tmp_path / "other.parquet"), [("k0", 0, 10)]))
    assert e.value.reason == "outside_root"


# --------------------------------------------------------------------- 3. parquet row groups

def test_corrupt_row_group_loses_only_its_rows(tmp_path, mk):
    rows = [(f"k{i:02d}", i % 3, mk.jpeg(i)) for i in range(12)]
    p = tmp_path / "pq" / "d.parquet"
    p.parent.mkdir()
    table = pa.table({"key": [k for k, _, _ in rows], "image": pa.array([img for _, _, img in rows], pa.binary()),
                      "label": pa.array([lbl for _, lbl, _ in rows], pa.int64())})
    pq.write_table(table, p, row_group_size=3, compression="none")
    raw = bytearray(p.read_bytes())
    col = pq.ParquetFile(p).metadata.row_group(1).column(1)  # row group 1's image column
    start = col.data_page_offset
    raw[start : start + 12] = b"\xff" * 12  # its page header is garbage now
    p.write_bytes(bytes(raw))
    with pytest.raises(Exception):
        pq.ParquetFile(p).read_row_group(1)
    r = as_json(run(mk, "info", p.parent, "--check", "--json"))
    assert r["ok"] == 9 and r["problems"] == {"bad_row_group": 3}, r
    assert [e["reason"] for e in r["shard_errors"]] == ["bad_parquet"] and "row group 1" in r["shard_errors"][0]["error"]
    m = str(tmp_path / "m.parquet")
    run(mk, "manifest", p.parent, "--out", m, ok=(0, 8))
    kept = pq.read_table(m).column("key").to_pylist()
    assert kept == [k for k, _, _ in rows[:3] + rows[6:]]
    r = as_json(run(mk, "export", m, "--to", "parquet", "--out", tmp_path / "out", "--json", ok=(0, 8)))
    assert r["samples"] == 9


# ---------------------------------------------------------------------- 4. labels and keys

def test_labels_and_keys_are_checked(tmp_path, mk):
    d = tmp_path / "wds"
    members = mk.sample("good", 1, mk.jpeg(1))
    for i, cls in enumerate([b"99999999999", b"2.7", b"inf", b"nan", b"-3000000000", b"1_0"]):
        members += [(f"c{i}.jpg", mk.jpeg(10 + i)), (f"c{i}.cls", cls)]
    for i, doc in enumerate(['{"label": 2.7}', '{"label": true}', '{"label": 1e400}', '{"label": 1099511627776}',
                             '{"label": NaN}', "[" * 100000]):
        members += [(f"j{i}.jpg", mk.jpeg(20 + i)), (f"j{i}.json", doc.encode())]
    mk.tar(d / "a.tar", members + mk.sample("good2", 2, mk.jpeg(2)))
    r = as_json(run(mk, "info", d, "--json"))
    assert r["ok"] == 2 and r["problems"] == {"bad_label": 12}, r
    assert all("a.tar" in e and "sample" in e for e in r["problem_examples"])

    p = tmp_path / "pq" / "a.parquet"
    p.parent.mkdir()
    n = 7
    pq.write_table(pa.table({
        "key": pa.array(["a", "b", "c", "d", None, "f", "g"]),
        "image": pa.array([mk.jpeg(i) for i in range(n)], pa.binary()),
        "label": pa.array([1.0, 2.7, float("inf"), float("nan"), 1.0, 3.0, None], pa.float64()),
    }), p)
    r = as_json(run(mk, "info", p, "--json"))
    assert r["ok"] == 3 and r["problems"] == {"bad_label": 3, "bad_key": 1}, r
    assert all("a.parquet" in e and "row" in e for e in r["problem_examples"])
    q = tmp_path / "pq2" / "b.parquet"
    q.parent.mkdir()
    pq.write_table(pa.table({"image": pa.array([mk.jpeg(1), mk.jpeg(2), mk.jpeg(3)], pa.binary()),
                             "label": pa.array([1 << 40, 5, -(1 << 33)], pa.int64())}), q)
    r = as_json(run(mk, "info", q, "--json"))
    assert r["ok"] == 1 and r["problems"] == {"bad_label": 2}, r
    b = tmp_path / "pq3" / "c.parquet"
    b.parent.mkdir()
    pq.write_table(pa.table({"image": pa.array([mk.jpeg(1), mk.jpeg(2)], pa.binary()), "label": pa.array([True, False])}), b)
    r = as_json(run(mk, "info", b, "--json"))
    assert r["ok"] == 0 and r["problems"] == {"bad_label": 2}, r


# ------------------------------------------------------------------------- 5. checkpoints

def safetensors_file(path, tensors: dict[str, np.ndarray], header_patch=None, cut: int = 0) -> str:
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = a.astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if header_patch:
        header_patch(header)
    h = json.dumps(header).encode()
    raw = struct.pack("<Q", len(h)) + h + b"".join(blobs)
    with open(path, "wb") as f:
        f.write(raw[: len(raw) - cut])
    return str(path)


def test_checkpoints_are_checked_before_allocating(tmp_path, mk):
    from dataprune.models import checkpoint_shapes, load_state_dict

    w = {"fc.weight": np.zeros((10, 4)), "fc.bias": np.zeros(10)}
    ok = safetensors_file(tmp_path / "ok.safetensors", w)
    assert checkpoint_shapes(ok) == {"fc.weight": (10, 4), "fc.bias": (10,)}

    def claims_100gb(h):
        h["fc.weight"]["shape"] = [25_000_000_000]
        h["fc.weight"]["data_offsets"] = [0, 100_000_000_000]

    bad = {
        "truncated": safetensors_file(tmp_path / "cut.safetensors", w, cut=20),
        "claims 100 GB": safetensors_file(tmp_path / "big.safetensors", w, claims_100gb),
        "tiny": str(tmp_path / "tiny.safetensors"),
        "header length 100 GB": str(tmp_path / "hdr.safetensors"),
        "fifo": make_fifo(tmp_path / "fifo.safetensors"),
    }
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with open(ok, "rb") as f:
        (tmp_path / "hdr.safetensors").write_bytes(struct.pack("<Q", 100 << 30) + f.read()[8:])
    for what, path in bad.items():
        for fn in (checkpoint_shapes, load_state_dict):
            with pytest.raises(ConfigError) as e:
                fn(path)
            assert path in str(e.value), (what, e.value)
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"fc.weight": Boom()}, protocol=2))
    with pytest.raises(ConfigError, match="refused"):
        load_state_dict(str(evil))
    assert not (tmp_path / "pwned").exists()

    demo = tmp_path / "demo"  # and through the CLI: one line, exit 2, the file named
    run(mk, "demo", demo, "--samples", "8", "--shard-size", "8")
    for path in (bad["header length 100 GB"], bad["claims 100 GB"]):
        r = run(mk, "score", demo, "--metric", "loss", "--checkpoint", path, "--epochs", "0", "--out", tmp_path / "s",
                ok=(2,))
        assert path in r.stderr and "safetensors" in r.stderr


def test_corrupt_gzip_shard_is_reported_not_silently_read(tmp_path, mk):
    """A .tar.gz whose data or CRC trailer was damaged decompresses to wrong bytes without an error until
    the end of the stream: the reader checks the trailer and reports the shard (and its last sample)."""
    import gzip

    members = [m for i in range(6) for m in mk.sample(f"{i:06d}", i % 2, mk.jpeg(i))]
    raw = gzip.compress(mk.tar_bytes(members), mtime=0)
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.tar.gz").write_bytes(raw)
    for name, payload in [("crc", raw[:-8] + bytes([raw[-8] ^ 0xFF]) + raw[-7:]), ("cut", raw[:-6])]:
        d = tmp_path / name
        d.mkdir()
        (d / "a.tar.gz").write_bytes(payload)
        r = as_json(run(mk, "info", d, "--json"))
        assert [e["shard"] for e in r["shard_errors"]] == ["a.tar.gz"], r
        assert r["ok"] == 5 and r["samples"] == 6  # the sample the damage was found in is counted, not kept
    assert as_json(run(mk, "info", good, "--json"))["shard_errors"] == []
