"""`export` and `manifest` on hostile input, through the real CLI in subprocesses (issue 12).

One test (or one parametrized family) per mechanism: names every writer refuses (and the fast path
never lets through), files in ``--out`` that are not ours (never deleted, never followed), exports
killed with SIGKILL / SIGTERM while building, while the writer renames and while publishing (never
looking finished; the rerun is byte-identical), one writer per ``--out``, a full disk, silent loss
(exit 8), and untrusted manifests. Every test checks the exit code, the single error line (no
traceback), what was written (read back with tarfile / pyarrow / os.walk) and what was not (canaries
inside and beside ``--out``), and that the good samples next to the bad ones are exported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.demo import make_demo
from dataprune.export.fastpath import _EXT_OK, _key_matrix
from dataprune.export.names import path_problem, text_problem
from dataprune.export.outdir import MARKER, STAGE
from dataprune.outlock import LOCK_NAME

INDEX = "index.json"
FINAL = {  # top-level names a finished export of each writer holds (besides index.json)
    "wds": re.compile(r"pruned-\d{6}\.tar|classes\.txt"),
    "parquet": re.compile(r"train-\d{5}-of-\d{5}\.parquet"),
    "folder": re.compile(r"[^.].*"),
    "list": re.compile(r"keys\.txt"),
}
# names no export may write: control characters of every kind, line/paragraph separators, DEL
HOSTILE = ["nl\nx", "cr\rx", "tab\tx", "del\x7fx", "esc\x1b[31mx", "bell\x07x", "c1\x85x", "ls\u2028x", "ps\u2029x"]
GOOD = ["good-a", "good-b", "sub/good-c", "good-d"]


# ------------------------------------------------------------------------------------- helpers

def cli(*args, cwd=None, timeout=180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "dataprune.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def error_line(r) -> str:
    """The run's one error line (and no traceback anywhere)."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().splitlines()[-1] == errors[0], r.stderr
    return errors[0]


def ok(r) -> subprocess.CompletedProcess:
    assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout, r.stderr
    return r


def digest(root) -> dict[str, str]:
    """relative path -> content hash / 'dir' / 'link:target' of everything below ``root`` (not following links)."""
    out = {}
    root = str(root)
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                with open(p, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def finished_tree(out) -> dict[str, str]:
    """An export directory's content, less the output lock (ours, kept between runs)."""
    return {k: v for k, v in digest(out).items() if k != LOCK_NAME}


def safe(name: str) -> bool:
    """The rule, written independently of dataprune: relative, no '..', no control character."""
    return (bool(name) and not name.startswith("/") and ".." not in name.split("/") and "\\" not in name
            and not any(ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029" for c in name))


def written_names(to: str, out: str) -> list[str]:
    """Every name the export wrote, read back with tools independent of dataprune."""
    names = []
    if to == "wds":
        for f in sorted(os.listdir(out)):
            if f.endswith(".tar"):
                with tarfile.open(os.path.join(out, f)) as tf:
                    names += tf.getnames()
    elif to == "parquet":
        for f in sorted(os.listdir(out)):
            if f.endswith(".parquet"):
                t = pq.read_table(os.path.join(out, f))
                names += t.column("key").to_pylist() + [i["path"] for i in t.column("image").to_pylist()]
    elif to == "folder":
        for d, dirs, files in os.walk(out):
            top = d == str(out)  # classes.txt at the top is the label map, not an exported sample
            names += [os.path.relpath(os.path.join(d, n), out) for n in dirs + files
                      if n not in (LOCK_NAME, INDEX) and not (top and n == "classes.txt")]
    else:
        raw = open(os.path.join(out, "keys.txt"), "rb").read().decode()
        lines = raw.split("\n")
        assert lines[-1] == "" and all(ln.count("\t") == 1 for ln in lines[:-1]), raw
        names += [part for ln in lines[:-1] for part in ln.split("\t")]
    return names


def exported_keys(to: str, out: str) -> set[str]:
    if to == "wds":
        return {n.rsplit(".", 1)[0] for n in written_names(to, out)}
    if to == "parquet":
        listed = {e["name"] for e in json.load(open(os.path.join(out, INDEX)))["written"]["entries"]}  # not a foreign file beside them
        return {k for f in os.listdir(out) if f.endswith(".parquet") and f in listed
                for k in pq.read_table(os.path.join(out, f)).column("key").to_pylist()}
    if to == "folder":  # the files inside what the export's record lists (a foreign file may sit beside them)
        listed = {e["name"].split("/")[0] for e in json.load(open(os.path.join(out, INDEX)))["written"]["entries"]}
        return {n.rsplit(".", 1)[0].split("/", 1)[-1] for n in written_names(to, out) if "." in n and n.split("/")[0] in listed}
    return {ln.split("\t")[1] for ln in open(os.path.join(out, "keys.txt")).read().splitlines()}


@pytest.fixture(scope="module")
def wds_manifest(data, tmp_path_factory) -> str:
    """A manifest of the shared 24-sample dataset (setup: made through the library, read-only)."""
    from dataprune.manifest import build_manifest

    m = str(tmp_path_factory.mktemp("manifest") / "m.parquet")
    build_manifest(data.wds_dir, m)
    return m


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """2000 tiny samples in 4 shards and their manifest: with --shard-size 1 an export has 2000 files to rename."""
    root = tmp_path_factory.mktemp("big")
    make_demo(str(root / "data"), n=2000, shard_size=500, image_size=8, seed=1)
    ok(cli("manifest", root / "data", "--out", root / "m.parquet"))
    flat = root / "flat"  # the same images as a flat folder: a folder export publishes 2000 top-level files
    flat.mkdir()
    for f in sorted(os.listdir(root / "data")):
        if f.endswith(".tar"):
            with tarfile.open(root / "data" / f) as tf:
                for m in tf:
                    if m.name.endswith(".jpg"):
                        (flat / m.name).write_bytes(tf.extractfile(m).read())
    return root


@pytest.fixture(scope="module")
def clean(big, tmp_path_factory):
    """Uninterrupted exports, the reference for every rerun: (writer, source) -> tree."""
    cache = {}

    def get(to: str, src: str, shard_size: int) -> dict:
        if (to, src, shard_size) not in cache:
            out = tmp_path_factory.mktemp("clean") / "out"
            ok(cli("export", src, "--to", to, "--out", out, "--shard-size", shard_size))
            cache[(to, src, shard_size)] = finished_tree(out)
        return cache[(to, src, shard_size)]

    return get


# ------------------------------------------------------------------------- 1. member names

def hostile_tar(path, mk, names=HOSTILE + GOOD):
    members = []
    for i, n in enumerate(names):
        members += [(f"{n}.jpg", mk.jpeg(i)), (f"{n}.cls", str(i % 10).encode())]
    mk.tar(path, members)


def manifest_of_tar(tar, out) -> str:
    """A manifest of every sample of ``tar``, made by hand (tarfile's offsets), whatever the sources
    think of the names: the export is what must refuse them."""
    rows: dict[str, tuple[int, int]] = {}
    with tarfile.open(tar) as tf:
        for m in tf:
            key = m.name.rsplit(".", 1)[0]
            rows[key] = (rows.get(key, (m.offset, 0))[0], m.offset_data + (m.size + 511) // 512 * 512)
    n = len(rows)
    table = pa.table({"sample_id": pa.array(range(n), pa.uint64()), "shard": [os.path.basename(tar)] * n, "key": list(rows),
                      "label": pa.array([1] * n, pa.int32()), "loc_path": [str(tar)] * n,
                      "loc_offset": pa.array([a for a, _ in rows.values()], pa.int64()),
                      "loc_size": pa.array([b - a for a, b in rows.values()], pa.int64())})
    meta = {"kind": "manifest", "source": {"format": "wds", "path": os.path.dirname(str(tar)), "options": {}}, "classes": None}
    pq.write_table(table.replace_schema_metadata({b"dataprune": json.dumps(meta).encode()}), out)
    return str(out)


@pytest.mark.parametrize("to", ["wds", "parquet", "folder", "list"])
@pytest.mark.parametrize("route", ["tar", "manifest", "folder", "parquet"])
def test_unsafe_names_are_refused_by_every_writer(tmp_path, mk, to, route):
    """Names with control characters, line breaks or '..' from any source never reach an output;
    the good samples beside them do; skip and raise report the same thing in one line."""
    data = tmp_path / "data"
    if route in ("tar", "manifest"):
        hostile_tar(data / "x.tar", mk)
        src = data if route == "tar" else manifest_of_tar(data / "x.tar", tmp_path / "m.parquet")  # (the fast path's route)
        bad, good = HOSTILE, GOOD
    elif route == "folder":
        for i, n in enumerate(HOSTILE[:3] + ["del\x7fx", "ls\u2028x"] + GOOD[:2]):
            (data / "cat").mkdir(parents=True, exist_ok=True)
            (data / "cat" / f"{n}.jpg").write_bytes(mk.jpeg(i))
        src, bad, good = data, HOSTILE[:3] + ["del\x7fx", "ls\u2028x"], ["cat/" + g for g in GOOD[:2]]
    else:
        keys = HOSTILE + ["../up", "/abs", "C:drive", "back\\slash", "a/../b"] + GOOD
        data.mkdir()
        pq.write_table(pa.table({"key": keys, "image": pa.array([mk.jpeg(i) for i in range(len(keys))], pa.binary()),
                                 "label": pa.array([i % 3 for i in range(len(keys))], pa.int64())}), data / "p.parquet")
        src, bad, good = data, keys[: -len(GOOD)], GOOD
    before = digest(tmp_path)
    out = tmp_path / "out"
    r = cli("export", src, "--to", to, "--out", out)
    assert r.returncode == 8, r.stderr
    line = error_line(r)
    assert "unsafe_name=" in line and "--allow-missing" in line
    idx = json.load(open(out / INDEX))
    assert sum(idx["skipped"].values()) == len(bad) and "unsafe_name" in idx["skipped"], idx["skipped"]
    assert idx["samples"] == len(good)
    names = written_names(to, str(out))
    assert names and all(safe(n) for n in names), [n for n in names if not safe(n)]
    want = {g.rsplit("/", 1)[-1] if to == "folder" else g for g in good}
    assert exported_keys(to, str(out)) == want
    # nothing outside --out changed; the inputs are untouched
    after = digest(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out")} == before
    # --on-error raise: exit 3, one line naming the shard and the sample
    r = cli("export", src, "--to", to, "--out", tmp_path / "out2", "--on-error", "raise")
    assert r.returncode == 3, r.stderr
    line = error_line(r)
    assert any(repr(b) in line or repr(b)[1:-1] in line for b in bad), line
    assert not (tmp_path / "out2" / INDEX).exists()


def test_fast_path_never_takes_a_name_the_per_sample_path_refuses(tmp_path, mk):
    """The vectorised name check is at least as strict as names.path_problem, character by character."""
    chars = [chr(c) for c in range(0, 256)] + ["\u2028", "\u2029", "é", "\u00a0"]
    for c in chars:
        for key in (f"a{c}b", f"{c}ab", f"ab{c}", f"x/{c}y"):
            if path_problem(key) is not None:
                assert _key_matrix(pa.array([key, "ok"], pa.string())) is None, repr(key)
        if ord(c) < 128 and text_problem(c) is not None:
            assert not _EXT_OK[ord(c)], repr(c)  # a member extension holding it never passes either
    assert not _EXT_OK[128:].any()  # nor any byte of a multi-byte character
    for key in ("../x", "x/..", "/abs", "C:x", "a\\b", "a/../b", ".."):
        assert path_problem(key) is not None and _key_matrix(pa.array([key], pa.string())) is None, key
    # end to end: a batch the fast path reads whole (plain ustar headers, one shard) with a DEL in a name
    data = tmp_path / "data"
    hostile_tar(data / "x.tar", mk, ["a", "del\x7fx", "b", "c"])
    m = manifest_of_tar(data / "x.tar", tmp_path / "m.parquet")
    r = cli("export", m, "--out", tmp_path / "out")
    assert r.returncode == 8 and "unsafe_name=1" in error_line(r)
    assert sorted(written_names("wds", str(tmp_path / "out"))) == ["a.cls", "a.jpg", "b.cls", "b.jpg", "c.cls", "c.jpg"]


# ------------------------------------------------------------- 2. never delete what is not ours

CANARIES = {"keys.txt": b"my keys\n", "train-00000-of-00001.parquet": b"not yours", "pruned-000000.tar": b"mine",
            "classes.txt": b"cat\ndog\n", "notes.md": b"# notes", ".hidden": b"h", "precious/data.bin": b"\x00" * 100}


def plant(out, forged_index: bool = True):
    for rel, data in CANARIES.items():
        p = out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    if forged_index:  # an index.json that lists "precious" the way old exports did
        (out / INDEX).write_text(json.dumps({"format": "folder", "entries": ["precious", "notes.md", "../beside"]}))


@pytest.mark.parametrize("to", ["wds", "parquet", "folder", "list"])
def test_foreign_files_in_out_are_never_deleted(data, wds_manifest, tmp_path, to):
    m = wds_manifest
    out = tmp_path / "out"
    plant(out)
    (tmp_path / "beside").write_text("next to --out")
    before, around = digest(out), digest(tmp_path)
    r = cli("export", m, "--to", to, "--out", out)
    assert r.returncode == 2 and "--overwrite" in error_line(r) and "did not write" in error_line(r)
    assert digest(out) == {**before, LOCK_NAME: digest(out)[LOCK_NAME]}  # only the lock was added
    # --overwrite: written beside them; only files at the names this export writes are replaced
    ok(cli("export", m, "--to", to, "--out", out, "--overwrite"))
    idx = json.load(open(out / INDEX))
    ours = {e["name"].split("/")[0] for e in idx["written"]["entries"]} | {INDEX}
    after = digest(out)
    for rel, h in before.items():
        if rel.split("/")[0] not in ours:
            assert after.get(rel) == h, rel
    assert digest(tmp_path)["beside"] == around["beside"]
    # a rerun without --overwrite: the foreign files still make it stop; with it, they still survive
    r = cli("export", m, "--to", to, "--out", out)
    assert r.returncode == 2, r.stderr
    ok(cli("export", m, "--to", to, "--out", out, "--overwrite"))
    again = digest(out)
    assert {k: v for k, v in again.items() if k.split("/")[0] not in ours} == {k: v for k, v in after.items() if k.split("/")[0] not in ours}
    assert exported_keys(to, str(out)) == set(data.truth)


def test_a_forged_record_cannot_delete_anything(data, wds_manifest, tmp_path):
    """A record of ours copied from another export, then edited to list other things (by name, with
    path tricks, or with a real output's name but another size): nothing it names is removed."""
    m = wds_manifest
    real = tmp_path / "real"
    ok(cli("export", m, "--out", real, "--to", "folder"))
    idx = json.load(open(real / INDEX))
    out = tmp_path / "out"
    (out / "precious").mkdir(parents=True)
    (out / "precious" / "a.jpg").write_bytes(b"family photo")
    (out / "0-red-disc").mkdir()
    (out / "0-red-disc" / "x.jpg").write_bytes(b"not an export")
    (tmp_path / "outside.txt").write_text("outside")
    idx["written"]["entries"] += [{"name": "precious", "digest": "1:00"}, {"name": "../outside.txt", "size": 7},
                                  {"name": "/etc/hostname", "size": 1}, {"name": "0-red-disc/x.jpg", "size": 999}]
    (out / INDEX).write_text(json.dumps(idx))

    def state():
        return {k: v for k, v in digest(tmp_path).items() if LOCK_NAME not in k}

    before = state()
    r = cli("export", m, "--out", out, "--to", "folder")
    assert r.returncode == 2 and "precious" in error_line(r)
    assert state() == before
    ok(cli("export", m, "--out", out, "--to", "folder", "--overwrite"))  # beside them: still nothing of theirs removed
    after = state()
    assert all(after.get(k) == v for k, v in before.items() if k.startswith(("out/precious", "out/0-red-disc/x.jpg", "outside")))
    assert after["out/0-red-disc/x.jpg"] == before["out/0-red-disc/x.jpg"] and "out/precious/a.jpg" in after


@pytest.mark.parametrize("name", ["pruned-000000.tar", "classes.txt", INDEX, MARKER, STAGE])
def test_symlinks_in_out_are_never_followed(data, wds_manifest, tmp_path, name):
    m = wds_manifest
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim, out / name)
    for extra in ([], ["--overwrite"]):
        r = cli("export", m, "--out", out, *extra)
        assert r.returncode == 2 and "symbolic link" in error_line(r), r.stderr
        assert victim.read_bytes() == b"do not touch" and os.readlink(out / name) == str(victim)
        assert not (out / INDEX).exists() or name == INDEX


def test_our_own_earlier_export_is_replaced_and_a_touched_one_is_not(data, wds_manifest, tmp_path):
    m = wds_manifest
    out = tmp_path / "out"
    ok(cli("export", m, "--out", out, "--to", "parquet", "--shard-size", 5))
    ok(cli("export", m, "--out", out, "--to", "list"))  # our own earlier export: replaced without --overwrite
    assert sorted(os.listdir(out)) == sorted([INDEX, LOCK_NAME, "keys.txt"])
    with open(out / "keys.txt", "a") as f:  # someone edits our output: it is no longer what we wrote
        f.write("theirs\tnow\n")
    kept = (out / "keys.txt").read_bytes()
    r = cli("export", m, "--out", out, "--to", "wds")
    assert r.returncode == 2 and "keys.txt" in error_line(r)
    assert (out / "keys.txt").read_bytes() == kept


# ---------------------------------------------------------------------------- 3. atomic exports

def run_and_signal(args, when, sig, timeout=120):
    """Start the CLI, send ``sig`` the moment ``when()`` is true; (returncode, stderr, hit)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
    p = subprocess.Popen([sys.executable, "-m", "dataprune.cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    hit = False
    deadline = time.monotonic() + timeout
    try:
        while p.poll() is None and time.monotonic() < deadline:
            if when():
                os.kill(p.pid, sig)
                hit = True
                break
        _, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err, hit


PHASES = {  # (writer, phase) -> the path whose appearance starts that phase (relative to --out)
    ("wds", "build"): f"{STAGE}/.pruned-000000-0000.tar.tmp",
    ("wds", "close"): f"{STAGE}/pruned-000000.tar",  # the writer's own renames, inside the stage
    ("wds", "publish"): "pruned-000000.tar",  # the renames into --out
    ("parquet", "publish"): "train-00000-of-02000.parquet",
    ("folder", "build"): f"{STAGE}/.dataprune-folder.tmp",
    ("folder", "close"): f"{STAGE}/000000.jpg",
    ("folder", "publish"): "000000.jpg",
    ("list", "build"): f"{STAGE}/keys.txt.tmp",
}


def check_never_looks_finished(out, reference: dict, final: re.Pattern) -> str:
    """The invariant after a kill: either a finished export identical to the reference, or no
    index.json and — if any final-named entry is there — the _INCOMPLETE marker; every final-named
    file present is complete (identical to the reference's)."""
    names = set(os.listdir(out))
    tree = finished_tree(out)
    if INDEX in names and MARKER not in names:
        assert tree == reference
        return "finished"
    assert INDEX not in names, sorted(names)
    finals = {n for n in names if final.fullmatch(n) and n not in (MARKER, STAGE, LOCK_NAME)}
    assert not finals or MARKER in names, sorted(names)
    for rel, h in tree.items():
        if rel.split("/")[0] in finals:
            assert reference.get(rel) == h, rel  # published files are whole
    return "partial" if finals else "nothing"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("to, phase", sorted(PHASES))
def test_killed_export_never_looks_finished_and_rerun_is_identical(big, clean, tmp_path, to, phase, sig):
    src = big / ("flat" if to == "folder" else "m.parquet")
    size = 1
    reference = clean(to, str(src), size)
    out = tmp_path / "out"
    watch = out / PHASES[(to, phase)]
    rc, err, hit = run_and_signal(["export", src, "--to", to, "--out", out, "--shard-size", size], watch.exists, sig)
    assert hit, f"the export finished before {watch} appeared: {err}"
    assert "Traceback" not in err
    state = check_never_looks_finished(out, reference, FINAL[to])
    if sig == signal.SIGTERM:
        assert rc in (130, 0), err
        if rc == 130:  # stopped cleanly: everything it wrote is gone again (the lock file stays)
            assert "interrupted" in err and sorted(os.listdir(out)) == [LOCK_NAME], os.listdir(out)
    else:
        assert rc == -signal.SIGKILL
        assert state == "finished" or MARKER in os.listdir(out)
        assert state != "nothing" if phase == "publish" else state != "finished", state  # the kill landed in its phase
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing beside --out
    ok(cli("export", src, "--to", to, "--out", out, "--shard-size", size))  # the rerun: no --overwrite needed
    assert finished_tree(out) == reference


def test_two_exports_on_one_out(big, clean, tmp_path):
    src, out = big / "m.parquet", tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    first = subprocess.Popen([sys.executable, "-m", "dataprune.cli", "export", src, "--to", "parquet", "--shard-size", "1",
                              "--out", out], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / STAGE).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        second = cli("export", src, "--out", out)
        still_running = first.poll() is None
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    assert still_running, "the first export ended before the second started: make it longer"
    assert second.returncode == 9, second.stderr
    line = error_line(second)
    assert "export" in line and f"pid {first.pid}" in line and str(out) in line
    assert finished_tree(out) == clean("parquet", str(src), 1)  # the first one's result, untouched by the second


def test_disk_full_is_one_line_naming_the_file_and_leaves_nothing_finished(big, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        for to in ("wds", "parquet", "folder"):
            out = mnt / f"out-{to}"
            src = big / "m.parquet"  # 2000 samples, several MB: more than the 1 MB disk
            r = cli("export", src, "--to", to, "--out", out, "--shard-size", 100)
            assert r.returncode == 1, (to, r.stderr)
            line = error_line(r)
            assert "No space left on device" in line and f"{out}/" in line, line
            named = line.split("error: ", 1)[1].split(": No space")[0]
            assert named.startswith(str(out / STAGE)) or named.startswith(str(out)), line
            assert sorted(os.listdir(out)) == [LOCK_NAME], os.listdir(out)  # nothing that looks finished (or half-made)
            shutil.rmtree(out)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ------------------------------------------------------------------------------ 4. no silent loss

@pytest.mark.parametrize("to", ["wds", "parquet", "folder", "list"])
def test_moved_or_missing_data_exits_8_with_the_counts(fresh_data, tmp_path, to):
    m = tmp_path / "m.parquet"
    ok(cli("manifest", fresh_data.wds_dir, "--out", m))
    shard = sorted(f for f in os.listdir(fresh_data.wds_dir) if f.endswith(".tar"))[1]
    os.unlink(os.path.join(fresh_data.wds_dir, shard))  # one shard gone: its samples are lost, the others are not
    out = tmp_path / "out"
    r = cli("export", m, "--to", to, "--out", out)
    assert r.returncode == 8, r.stderr
    line = error_line(r)
    idx = json.load(open(out / INDEX))
    lost = sum(idx["skipped"].values())
    assert lost == 10 and idx["samples"] == 14 and f"{lost} samples left out" in line and "--allow-missing" in line
    assert all(f"{k}={v}" in line for k, v in idx["skipped"].items())
    assert len(exported_keys(to, str(out))) == 14
    r = cli("export", m, "--to", to, "--out", out, "--allow-missing")
    ok(r)
    assert "skipped" in r.stdout
    shutil.move(fresh_data.root, tmp_path / "moved")  # the whole dataset moved: nothing can be exported
    r = cli("export", m, "--to", to, "--out", out)
    assert r.returncode == 8 and "0 samples written" in error_line(r)
    assert json.load(open(out / INDEX))["samples"] == 0


def test_manifest_exits_8_when_it_left_samples_out(tmp_path, mk):
    data = tmp_path / "data"
    mk.tar(data / "a.tar", mk.sample("k1", 1, mk.jpeg(1)) + [("lonely.txt", b"x")] + mk.sample("k2", 2, mk.jpeg(2)))
    r = cli("manifest", data, "--out", tmp_path / "m.parquet")
    assert r.returncode == 8 and "no_image=1" in error_line(r) and "wrote 2 rows" in r.stdout
    assert pq.read_table(tmp_path / "m.parquet").column("key").to_pylist() == ["k1", "k2"]
    (tmp_path / "keys.csv").write_text("key\nk1\nnot-there\n")
    r = cli("manifest", data, "--keys", tmp_path / "keys.csv", "--out", tmp_path / "m2.parquet")
    assert r.returncode == 8 and "1 listed key not found" in error_line(r)
    ok(cli("manifest", data, "--keys", tmp_path / "keys.csv", "--out", tmp_path / "m2.parquet", "--allow-missing"))


# ------------------------------------------------------------------------- 6. untrusted manifests

def edited(src: str, dst, change=None, meta=None):
    t = pq.read_table(src)
    if change:
        t = change(t)
    md = t.schema.metadata if meta is None else {b"dataprune": meta if isinstance(meta, bytes) else json.dumps(meta).encode()}
    pq.write_table(t.replace_schema_metadata(md), dst)
    return dst


def col(name, fn):
    return lambda t: t.set_column(t.column_names.index(name), name, fn(t.column(name)))


TABLE_CASES = {  # case -> (change, meta, exit code, text in the error line)
    "int128_sample_id": (col("sample_id", lambda c: c.cast(pa.decimal128(38, 0))), None, 0, None),
    "string_sample_id": (col("sample_id", lambda c: c.cast(pa.string())), None, 0, None),
    "large_strings": (col("key", lambda c: c.cast(pa.large_string())), None, 0, None),
    "binary_sample_id": (col("sample_id", lambda c: pa.array([b"0123456789abcdef"] * len(c), pa.binary(16))), None, 5, "sample_id"),
    "negative_sample_id": (col("sample_id", lambda c: pa.array([-1] * len(c), pa.int64())), None, 5, "sample_id"),
    "string_loc_size": (col("loc_size", lambda c: pa.array(["big"] * len(c))), None, 5, "loc_size"),
    "fraction_loc_offset": (col("loc_offset", lambda c: pa.array([0.5] * len(c))), None, 5, "loc_offset"),
    "huge_label": (col("label", lambda c: pa.array([1 << 40] * len(c), pa.int64())), None, 5, "label"),
    "missing_column": (lambda t: t.drop_columns(["loc_size"]), None, 5, "loc_size"),
    "metadata_not_json": (None, b"{oops", 5, "not valid JSON"),
    "metadata_not_utf8": (None, b"\xff\xfe", 5, "JSON"),
    "metadata_a_list": (None, b"[1, 2]", 5, "not a dataprune manifest"),
    "source_wrong_type": (None, {"kind": "manifest", "source": {"format": "wds", "path": 3}}, 5, "source"),
    "source_a_string": (None, {"kind": "manifest", "source": "/data"}, 5, "source"),
    "source_bad_options": (None, {"kind": "manifest", "source": {"format": "wds", "path": "/x", "options": {"a": [1]}}}, 5, "source"),
    "source_unknown_format": (None, {"kind": "manifest", "source": {"format": "zip", "path": "/x"}}, 5, "zip"),
    "classes_not_a_list": (None, "classes=7", 5, "class names"),
    "class_with_newline": (None, "classes=nl", 5, "line break"),
}


@pytest.mark.parametrize("case", sorted(TABLE_CASES))
def test_hostile_manifest_tables_are_one_line_errors(data, wds_manifest, tmp_path, case):
    m = wds_manifest
    change, meta, code, text = TABLE_CASES[case]
    if isinstance(meta, str):  # edits of the real metadata
        real = json.loads(pq.read_schema(m).metadata[b"dataprune"])
        meta = {**real, "classes": 7 if meta == "classes=7" else ["a\nb"] + real["classes"][1:]}
    bad = edited(m, tmp_path / "bad.parquet", change, meta)
    r = cli("export", bad, "--out", tmp_path / "out")
    assert r.returncode == code, r.stderr
    if code:
        assert text in error_line(r) and "bad.parquet" in error_line(r)
        assert not (tmp_path / "out" / INDEX).exists()
    else:
        ok(cli("export", m, "--out", tmp_path / "ref"))
        assert finished_tree(tmp_path / "out")["pruned-000000.tar"] == finished_tree(tmp_path / "ref")["pruned-000000.tar"]


def test_hostile_manifest_rows_are_skipped_and_the_rest_exported(data, wds_manifest, tmp_path):
    """Null keys, null/negative/2⁴⁰ sizes and offsets: per-row skips with a reason, never a traceback
    or a terabyte allocation; every good row is exported (fast path included), and under raise the
    one line names the row."""
    m = wds_manifest
    t = pq.read_table(m)
    n = t.num_rows
    sizes, offs, keys = t.column("loc_size").to_pylist(), t.column("loc_offset").to_pylist(), t.column("key").to_pylist()
    sizes[1], sizes[2], sizes[3], offs[4], offs[5], keys[6], sizes[7] = -512, 1 << 40, None, -1, 1 << 61, None, (1 << 62)
    t = t.set_column(t.column_names.index("loc_size"), "loc_size", pa.array(sizes, pa.int64()))
    t = t.set_column(t.column_names.index("loc_offset"), "loc_offset", pa.array(offs, pa.int64()))
    t = t.set_column(t.column_names.index("key"), "key", pa.array(keys, pa.string()))
    bad = edited(m, tmp_path / "bad.parquet", lambda _: t)
    for to in ("wds", "list"):
        out = tmp_path / f"out-{to}"
        r = cli("export", bad, "--to", to, "--out", out)
        assert r.returncode == 8, r.stderr
        line = error_line(r)
        idx = json.load(open(out / INDEX))
        assert sum(idx["skipped"].values()) == 7 and idx["samples"] == n - 7, idx["skipped"]
        assert idx["skipped"].get("bad_row") == 1 and "bad_row=1" in line
        assert all(c["seen"] == c["kept"] + c["skipped"] for c in idx["shards"].values())
        good = {k for i, k in enumerate(keys) if i not in range(1, 8)}
        assert exported_keys(to, str(out)) == good
    r = cli("export", bad, "--out", tmp_path / "raise", "--on-error", "raise")
    assert r.returncode == 5 and "row 1" in error_line(r), r.stderr


# ------------------------------------------------------------- found by an adversarial review

@pytest.fixture
def small_manifest(tmp_path):
    make_demo(str(tmp_path / "data"), n=20, shard_size=10, image_size=8)
    ok(cli("manifest", tmp_path / "data", "--out", tmp_path / "m.parquet"))
    return tmp_path / "m.parquet"


@pytest.mark.parametrize("kind", ["hardlink", "fifo", "directory"])
def test_a_lock_that_is_not_our_own_regular_file_is_refused_and_never_written(tmp_path, small_manifest, kind):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    {"hardlink": lambda: os.link(victim, lock), "fifo": lambda: os.mkfifo(lock), "directory": lambda: lock.mkdir()}[kind]()
    r = cli("export", small_manifest, "--to", "list", "--out", out, timeout=60)
    assert r.returncode == 9 and LOCK_NAME in error_line(r)
    assert victim.read_text() == "precious data"
    assert not (out / "keys.txt").exists()


@pytest.mark.parametrize("what", ["file", "dangling-link"])
def test_an_out_that_is_not_a_directory_is_a_config_error(tmp_path, small_manifest, what):
    out = tmp_path / "out"
    if what == "file":
        out.write_text("mine")
    else:
        out.symlink_to(tmp_path / "nowhere")
    r = cli("export", small_manifest, "--out", out)
    assert r.returncode == 2 and "not a directory" in error_line(r)
    assert not (tmp_path / "nowhere").exists() and (what != "file" or out.read_text() == "mine")


DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("where", ["index", "marker", "manifest-metadata"])
def test_deeply_nested_json_is_one_line_never_a_recursion_traceback(tmp_path, small_manifest, where):
    out = tmp_path / "out"
    out.mkdir()
    m = small_manifest
    if where == "index":
        (out / INDEX).write_text(DEEP)
    elif where == "marker":
        (out / MARKER).write_text(DEEP)
    else:
        t = pq.read_table(m)
        m = tmp_path / "deep.parquet"
        pq.write_table(t.replace_schema_metadata({"dataprune": DEEP}), m)
    r = cli("export", m, "--out", out, "--overwrite")
    assert "Traceback" not in r.stderr and "RecursionError" not in r.stderr, r.stderr[-2000:]
    if where == "manifest-metadata":
        assert r.returncode == 5 and "deep.parquet" in error_line(r)
    else:  # a record we cannot read is not ours: the foreign file stays, the export is written beside it
        assert r.returncode == 0 and (out / "pruned-000000.tar").exists()


def test_class_names_keep_their_labels_in_a_folder_export(tmp_path):
    """Blank lines in classes.txt keep their label's place; names that clean up to the same directory never merge."""
    from dataprune.sources import open_source

    for case, edit in [("blank", {6: "", 8: ""}), ("clash", {6: "a/b", 8: "a_b"})]:
        data = tmp_path / case
        make_demo(str(data), n=40, shard_size=20, image_size=8)
        names = (data / "classes.txt").read_text().splitlines()
        for i, v in edit.items():
            names[i] = v
        (data / "classes.txt").write_text("\n".join(names) + "\n")
        assert open_source(str(data)).classes[7] == names[7]  # later names do not shift
        out = tmp_path / f"out-{case}"
        ok(cli("export", data, "--to", "folder", "--out", out))
        src = open_source(str(data))
        labels = {s.key: s.label for sh in src.list_shards() for s in src.iter_samples(sh)}
        for d in (p for p in out.iterdir() if p.is_dir()):
            found = {labels[f.stem] for f in d.iterdir()}
            assert len(found) == 1, f"{d.name} holds labels {found}"
            (lab,) = found
            # names that would merge or leave a blank fall back to label-prefixed names for every class, so
            # sorted directory names (torchvision's ImageFolder) still number classes as the dataset does
            assert d.name == (f"{lab:03d}_{names[lab]}" if names[lab] and lab not in edit else
                              f"{lab:03d}" if not names[lab] else d.name)
            assert d.name.startswith(f"{lab:03d}")
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [p.name for p in sorted(out.iterdir()) if p.is_dir()]
        assert (out / "classes.txt").read_text().splitlines() == names
