"""Export: round trips between formats, determinism, webdataset compatibility, safety, interruption."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.errors import ConfigError, Incomplete, SourceError
from dataprune.export import ExportConfig, export, writer_class
from dataprune.export.fastpath import _FastPath
from dataprune.export.outdir import MARKER, STAGE
from dataprune.manifest import build_manifest
from dataprune.outlock import LOCK_NAME
from dataprune.sources import open_source
from dataprune.tables import read_manifest, write_parquet_atomic


def listing(out: str) -> list[str]:
    """What an export directory holds, less the output lock (ours, kept between runs)."""
    return sorted(n for n in os.listdir(out) if n != LOCK_NAME)


def shards_of(out: str, pattern: str = "pruned-*.tar") -> list[str]:
    return sorted(glob.glob(os.path.join(out, pattern)))


def file_hashes(paths) -> dict[str, str]:
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}


def samples_of(path: str, **opts) -> dict[str, tuple]:
    """key -> (label, image bytes) of every ok sample, read back through dataprune's sources."""
    src = open_source(path, **opts)
    out = {}
    for sh in src.list_shards():
        for s in src.iter_samples(sh):
            assert s.ok, s.error
            out[s.key] = (s.label, s.image)
    return out


def wds_read(out: str) -> list[dict]:
    import webdataset as wds

    urls = shards_of(out)
    assert urls
    return list(wds.WebDataset(urls, shardshuffle=False))


# --------------------------------------------------------------------------------- round trips

def test_folder_wds_parquet_wds_round_trip(data, tmp_path):
    wds1, pq1, wds2 = str(tmp_path / "wds1"), str(tmp_path / "pq1"), str(tmp_path / "wds2")
    r = export(data.folder, ExportConfig(to="wds", out=wds1, shard_size=7))
    assert r["samples"] == 24 and len(r["files"]) == 4
    assert open(os.path.join(wds1, "classes.txt")).read().split() == data.classes
    export(wds1, ExportConfig(to="parquet", out=pq1, shard_size=10))
    assert listing(pq1) == ["index.json", "train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
                                       "train-00002-of-00003.parquet"]
    # the manifest route for the last hop (export reads locations back from the parquet files)
    m = str(tmp_path / "m.parquet")
    build_manifest(pq1, m)
    export(m, ExportConfig(to="wds", out=wds2, shard_size=100))

    start = samples_of(data.folder)
    assert set(start) == {f"{data.classes[lbl]}/{k}" for k, (lbl, _) in data.truth.items()}
    for stage in (wds1, pq1, wds2):
        assert samples_of(stage) == start, stage
    pq_src = open_source(pq1)
    assert len(pq_src.list_shards()) == 3 and pq_src.classes == data.classes
    # HF datasets layout: features metadata with the class names
    meta = json.loads(pq.read_schema(os.path.join(pq1, "train-00000-of-00003.parquet")).metadata[b"huggingface"])
    assert meta["info"]["features"]["label"]["names"] == data.classes


@pytest.mark.parametrize("attr", ["wds_dir", "wds_gz", "hf_parquet", "flat"])
def test_every_source_exports_to_wds(data, tmp_path, attr):
    out = str(tmp_path / "out")
    r = export(getattr(data, attr), ExportConfig(out=out, shard_size=10))
    got = samples_of(out)
    want = samples_of(getattr(data, attr))
    assert r["samples"] == 24 and got == want
    assert all(v["seen"] == v["kept"] + v["skipped"] for v in r["shards"].values())


def test_member_bytes_copied_unchanged(tmp_path, mk):
    d = tmp_path / "in"
    extra = json.dumps({"label": 3, "caption": "é"}).encode()
    mk.tar(d / "a.tar", [("s1.jpg", mk.jpeg(1)), ("s1.json", extra), ("s1.txt", b"hello"), ("s1.cls", b"3"),
                         ("s2.png", mk.png(np.zeros((2, 2, 3), np.uint8))), ("s2.cls", b"1")])
    out = str(tmp_path / "out")
    m = str(tmp_path / "m.parquet")
    build_manifest(str(d), m)
    export(m, ExportConfig(out=out))
    src = mk.read_tar(str(d / "a.tar"))
    assert {k: v for p in shards_of(out) for k, v in mk.read_tar(p).items()} == src
    with tarfile.open(shards_of(out)[0]) as tf:
        assert all(i.mtime == 0 and i.uid == 0 and i.gid == 0 and i.mode == 0o444 and not i.uname for i in tf.getmembers())


# ------------------------------------------------------------------------------ determinism

def manifest_of(data, tmp_path, frac=1.0, name="m.parquet", seed=0):
    m = str(tmp_path / name)
    build_manifest(data.wds_dir, m)
    if frac < 1.0:
        t, meta = read_manifest(m)
        keep = np.random.default_rng(seed).random(t.num_rows) < frac
        write_parquet_atomic(t.filter(pa.array(keep)), m, meta)
    return m


@pytest.mark.parametrize("kw", [{}, {"shuffle": True, "seed": 5}, {"max_shard_bytes": 20_000, "shard_size": 1000}])
def test_rerun_is_byte_identical(data, tmp_path, kw):
    m = manifest_of(data, tmp_path, 0.7)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ra = export(m, ExportConfig(out=a, shard_size=kw.pop("shard_size", 6), **kw))
    first = file_hashes(shards_of(a))
    export(m, ExportConfig(out=a, shard_size=ra["shard_size"], **kw))  # into the same directory again
    export(m, ExportConfig(out=b, shard_size=ra["shard_size"], **kw))
    assert file_hashes(shards_of(a)) == first == file_hashes(shards_of(b))
    assert len(first) >= 2


def test_fast_path_matches_per_sample_path(data, tmp_path, monkeypatch):
    """The vectorised wds->wds copy writes exactly what the per-sample writer writes."""
    m = manifest_of(data, tmp_path, 0.8)
    for kw in ({"shard_size": 5}, {"shuffle": True, "seed": 1, "shard_size": 4}, {"max_shard_bytes": 15_000, "shard_size": 1000},
               {}, {"max_shard_bytes": 15_000}):  # the last two: the default shard sizes (balanced, at least 16 shards)
        fast, slow = str(tmp_path / "fast"), str(tmp_path / "slow")
        calls = []
        real = _FastPath._batch
        monkeypatch.setattr(_FastPath, "_batch", lambda self, *a: calls.append(1) or real(self, *a))
        export(m, ExportConfig(out=fast, **kw))
        assert calls, "fast path not taken"
        monkeypatch.setattr(_FastPath, "_batch", lambda self, *a: False)
        export(m, ExportConfig(out=slow, **kw))
        assert file_hashes(shards_of(fast)) == file_hashes(shards_of(slow))


def test_fast_path_mixed_keys_and_members(tmp_path, mk, monkeypatch):
    """Keys of different lengths (with directories), several extensions, a long member name, a
    GNU-format tar and one with garbage in its padding: both paths give the same bytes."""
    d = tmp_path / "in"
    members = []
    for i, key in enumerate(["a", "bb/ccc", "d_1", "x" * 40, "dir.v2/e"]):
        members += [(f"{key}.jpg", mk.jpeg(i)), (f"{key}.json", b'{"label": %d}' % i)]
        if i % 2:
            members += [(f"{key}.txt", b"t" * (i * 100)), (f"{key}.cls", str(i).encode())]
    mk.tar(d / "p0.tar", members)
    mk.tar(d / "p1.tar", mk.sample("q" * 90, 1, mk.jpeg(9)) + mk.sample("r", 2, mk.jpeg(8)))  # a 94-char name
    raw = bytearray(mk.tar_bytes(mk.sample("s1", 1, mk.jpeg(7)) + mk.sample("s2", 2, mk.jpeg(6))))
    end = 512 + len(mk.jpeg(7))
    raw[end : end + 5] = b"JUNK!"  # non-zero padding after s1.jpg
    (d / "p2.tar").write_bytes(bytes(raw))
    (d / "p3.tar").write_bytes(mk.tar_bytes(mk.sample("g1", 3, mk.jpeg(5)), fmt=tarfile.GNU_FORMAT))
    m = str(tmp_path / "m.parquet")
    build_manifest(str(d), m)
    fast, slow = str(tmp_path / "fast"), str(tmp_path / "slow")
    done = []
    real = _FastPath._batch
    monkeypatch.setattr(_FastPath, "_batch", lambda self, *a: done.append(real(self, *a)) or done[-1])
    rf = export(m, ExportConfig(out=fast, shard_size=100))
    assert done == [True]  # one batch, all of it on the fast path (padding zeroed, GNU headers rebuilt)
    monkeypatch.setattr(_FastPath, "_batch", lambda self, *a: False)
    rs = export(m, ExportConfig(out=slow, shard_size=100))
    assert rf["samples"] == rs["samples"] == 10
    assert file_hashes(shards_of(fast)) == file_hashes(shards_of(slow))
    got = {s["__key__"] for s in wds_read(fast)}
    assert got == {"a", "bb/ccc", "d_1", "x" * 40, "dir.v2/e", "q" * 90, "r", "s1", "s2", "g1"}


def test_webdataset_reads_output(data, tmp_path):
    out = str(tmp_path / "out")
    export(manifest_of(data, tmp_path), ExportConfig(out=out, shard_size=10))
    got = wds_read(out)
    assert [s["__key__"] for s in got] == sorted(data.truth)
    for s in got:
        label, img = data.truth[s["__key__"]]
        assert s["jpg"] == img and int(s["cls"]) == label


def test_shuffle_is_seeded(data, tmp_path):
    m = manifest_of(data, tmp_path)

    def order(seed, name):
        out = str(tmp_path / name)
        export(m, ExportConfig(out=out, shuffle=True, seed=seed, shard_size=1000))
        return [s["__key__"] for s in wds_read(out)]

    a, b, c = order(1, "a"), order(1, "b"), order(2, "c")
    assert a == b and a != c and sorted(a) == sorted(c) == sorted(data.truth)
    assert a != sorted(a)


def test_max_shard_bytes(data, tmp_path):
    out = str(tmp_path / "out")
    limit = 16_000
    r = export(manifest_of(data, tmp_path), ExportConfig(out=out, shard_size=1000, max_shard_bytes=limit))
    sizes = [os.path.getsize(p) for p in shards_of(out)]
    assert len(sizes) >= 3 and all(s <= limit for s in sizes) and all(s % 10240 == 0 for s in sizes)
    assert [f["bytes"] for f in r["files"]] == sizes
    assert sum(f["samples"] for f in r["files"]) == 24 == len(wds_read(out))


# ------------------------------------------------------------------------------ other writers

def test_folder_export_hard_links(data, tmp_path):
    out = str(tmp_path / "out")
    r = export(data.folder, ExportConfig(to="folder", out=out))
    assert r["hard_links"] == 24 and r["copies"] == 0
    for key, (label, img) in data.truth.items():
        dst = os.path.join(out, data.classes[label], key + ".jpg")
        srcp = os.path.join(data.folder, data.classes[label], key + ".jpg")
        assert os.stat(dst).st_ino == os.stat(srcp).st_ino and os.stat(dst).st_nlink >= 2
    # an ImageFolder reads the same classes back
    from torchvision.datasets.folder import find_classes

    assert find_classes(out)[0] == data.classes  # every class has its folder, empty or not: labels keep their numbers
    assert r["label_order_kept"] is True and r["class_dirs"] == data.classes
    assert open(os.path.join(out, "classes.txt"), encoding="utf-8").read().splitlines() == data.classes
    # rerun (links to the same inodes already there): no leftovers, same result
    export(data.folder, ExportConfig(to="folder", out=out))
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
    assert leftovers == [] and not os.path.exists(os.path.join(out, STAGE))


def test_folder_export_from_tar_copies(data, tmp_path):
    out = str(tmp_path / "out")
    r = export(data.wds_dir, ExportConfig(to="folder", out=out))
    assert r["copies"] == 24 and r["hard_links"] == 0
    assert samples_of(out) == {f"{data.classes[lbl]}/{k}": (lbl, img) for k, (lbl, img) in data.truth.items()}


def test_folder_rerun_with_smaller_selection_leaves_no_stale_files(data, tmp_path):
    out = str(tmp_path / "out")
    export(data.wds_dir, ExportConfig(to="folder", out=out))
    m = manifest_of(data, tmp_path, 0.5, seed=3)
    r = export(m, ExportConfig(to="folder", out=out))
    files = [f for _, _, fs in os.walk(out) for f in fs if f not in ("index.json", "classes.txt", LOCK_NAME)]
    assert len(files) == r["samples"] < 24
    assert r["empty_classes"]  # some classes have no sample left: their folders stay, so ImageFolder does not renumber
    assert r["label_order_kept"] is True and sorted(os.listdir(out)) == sorted(data.classes + ["classes.txt", "index.json", LOCK_NAME])
    assert any("allow_empty=True" in n for n in r["notes"])


def test_list_export(data, tmp_path):
    out = str(tmp_path / "out")
    r = export(data.wds_dir, ExportConfig(to="list", out=out))
    lines = open(os.path.join(out, "keys.txt")).read().splitlines()
    assert r["files"] == [{"name": "keys.txt", "samples": 24}]
    shards = {s.name for s in open_source(data.wds_dir).list_shards()}
    assert sorted(tuple(ln.split("\t")) for ln in lines) == sorted(
        (f"demo-{int(k) // 10:06d}.tar", k) for k in data.truth)
    assert {ln.split("\t")[0] for ln in lines} == shards


def test_same_key_in_two_input_shards(tmp_path, mk):
    d = tmp_path / "in"
    for s in range(2):
        mk.tar(d / f"part-{s}.tar", mk.sample("k1", s, mk.jpeg(s)) + mk.sample("k2", s, mk.jpeg(10 + s)))
    out = str(tmp_path / "out")
    m = str(tmp_path / "m.parquet")
    build_manifest(str(d), m)
    r = export(m, ExportConfig(out=out, shard_size=10))
    got = samples_of(out)  # would report duplicate_key if the writer reused keys
    assert len(got) == 4 and r["renamed_keys"] == 2
    assert set(got) == {"k1", "k2", "part-1/k1", "part-1/k2"}
    pqout = str(tmp_path / "pq")
    export(m, ExportConfig(to="parquet", out=pqout, shard_size=10))  # one file: its keys are made unique
    assert len(samples_of(pqout)) == 4


# --------------------------------------------------------------------------------- safety

def test_nothing_written_outside_out_and_inputs_unmodified(fresh_data, tmp_path, mk):
    d = fresh_data
    before = mk.digest(d.root)
    outer = str(tmp_path)
    outer_before = sorted(os.listdir(outer))
    m = str(tmp_path / "m.parquet")
    build_manifest(d.wds_dir, m)
    outer_before = sorted(os.listdir(outer))
    for to in ("wds", "parquet", "folder", "list"):
        export(m, ExportConfig(to=to, out=str(tmp_path / f"out-{to}")))
        export(d.folder, ExportConfig(to=to, out=str(tmp_path / f"fout-{to}")))
    assert mk.digest(d.root) == before
    assert sorted(os.listdir(outer)) == sorted(outer_before + [f"out-{t}" for t in ("wds", "parquet", "folder", "list")]
                                               + [f"fout-{t}" for t in ("wds", "parquet", "folder", "list")])


@pytest.mark.parametrize("where", ["inside", "same", "via_symlink"])
def test_out_inside_input_refused(fresh_data, tmp_path, mk, where):
    before = mk.digest(fresh_data.root)
    out = {"inside": os.path.join(fresh_data.wds_dir, "sub"), "same": fresh_data.wds_dir,
           "via_symlink": str(tmp_path / "link" / "o")}[where]
    if where == "via_symlink":
        os.symlink(fresh_data.wds_dir, tmp_path / "link")
    with pytest.raises(ConfigError, match="inside the input"):
        export(fresh_data.wds_dir, ExportConfig(out=out))
    with pytest.raises(ConfigError, match="inside the input"):
        export(fresh_data.folder, ExportConfig(to="folder", out=os.path.join(fresh_data.folder, "x")))
    assert mk.digest(fresh_data.root) == before


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("to", ["wds", "parquet", "folder", "list"])
@pytest.mark.parametrize("path", ["stream", "manifest"])
def test_failed_export_leaves_nothing_that_looks_complete(data, tmp_path, monkeypatch, to, path):
    out = str(tmp_path / "out")
    export(data.wds_dir, ExportConfig(to=to, out=out, shard_size=5))  # an earlier, complete export
    writer = writer_class(to)
    real_add = writer.add
    count = {"n": 0}

    def add(self, *a):
        count["n"] += 1
        if count["n"] == 13:
            raise Boom("disk on fire")
        return real_add(self, *a)

    monkeypatch.setattr(writer, "add", add)
    monkeypatch.setattr(_FastPath, "_batch", lambda self, *a: False)
    src = manifest_of(data, tmp_path) if path == "manifest" else data.wds_dir
    with pytest.raises(Boom):
        export(src, ExportConfig(to=to, out=out, shard_size=5))
    assert listing(out) == [], os.listdir(out)  # the old export was replaced, the new one cleaned up


def test_sigkill_mid_export_then_rerun(data, tmp_path):
    out = str(tmp_path / "out")
    m = manifest_of(data, tmp_path)
    script = f"""
import time, dataprune.export as e
from dataprune.export.fastpath import _FastPath
from dataprune.export.wds import WdsWriter
real = WdsWriter.add
def slow(self, *a):
    if self.files and len(self.files) >= 2:
        open({str(tmp_path / 'ready')!r}, 'w').close()
        time.sleep(60)
    return real(self, *a)
WdsWriter.add = slow
_FastPath._batch = lambda self, *a: False
e.export({m!r}, e.ExportConfig(out={out!r}, shard_size=5))
"""
    p = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if os.path.exists(tmp_path / "ready") or p.poll() is not None:
                break
            time.sleep(0.05)
        assert os.path.exists(tmp_path / "ready"), "child never reached the second shard"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
    assert listing(out) == sorted([MARKER, STAGE]), listing(out)  # no final-named shard, no index.json; marked unfinished
    r = export(m, ExportConfig(out=out, shard_size=5))
    assert listing(out) == sorted([f["name"] for f in r["files"]] + ["classes.txt", "index.json"])
    clean = str(tmp_path / "clean")
    export(m, ExportConfig(out=clean, shard_size=5))
    assert file_hashes(shards_of(out)) == file_hashes(shards_of(clean))


# ----------------------------------------------------------------------- manifests from keys

@pytest.mark.parametrize("kind", ["key", "shard_key", "sample_id", "parquet"])
def test_manifest_from_users_keys_then_export(data, tmp_path, kind):
    wanted = sorted(data.truth)[::3]
    src = open_source(data.wds_dir)
    by_key = {s.key: s for sh in src.list_shards() for s in src.iter_samples(sh)}
    keyfile = tmp_path / ("keys.parquet" if kind == "parquet" else "keys.csv")
    if kind == "key":
        keyfile.write_text("key\n" + "\n".join(wanted) + "\nnot-there\n")
    elif kind == "shard_key":
        keyfile.write_text("shard,key\n" + "\n".join(f"{by_key[k].shard},{k}" for k in wanted) + "\n")
    elif kind == "sample_id":
        keyfile.write_text("sample_id,note\n" + "\n".join(f"{by_key[k].sample_id},x" for k in wanted) + "\n")
    else:
        pq.write_table(pa.table({"key": wanted}), keyfile)
    m = str(tmp_path / "m.parquet")
    r = build_manifest(data.wds_dir, m, keys=str(keyfile))
    assert r["rows"] == len(wanted) and r["keys_missing"] == (1 if kind == "key" else 0)
    t, meta = read_manifest(m)
    assert meta["selection"]["strategy"] == "keys"
    out = str(tmp_path / "out")
    export(m, ExportConfig(out=out))
    assert sorted(samples_of(out)) == wanted


def test_manifest_is_plain_parquet(data, tmp_path):
    import duckdb

    m = str(tmp_path / "m.parquet")
    build_manifest(data.wds_dir, m)
    t = pq.read_table(m)
    assert {"sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size"} <= set(t.column_names)
    assert t.column("sample_id").type == pa.uint64()
    n = duckdb.sql(f"select count(*) from read_parquet('{m}') where label is not null").fetchall()[0][0]
    assert n == 24
    assert os.path.isabs(read_manifest(m)[1]["source"]["path"])


def test_manifest_export_from_another_directory(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.root)
    m = str(tmp_path / "m.parquet")
    build_manifest("hf", m)  # relative dataset path
    monkeypatch.chdir(tmp_path)
    export(m, ExportConfig(out="out", shard_size=100))  # one shard (keys repeat across the two input files)
    assert len(samples_of(str(tmp_path / "out"))) == 24


# ------------------------------------------------------------------------------- bad input

def bad_dataset(tmp_path, mk):
    d = tmp_path / "bad"
    mk.tar(d / "a-good.tar", mk.sample("g1", 1, mk.jpeg(1)) + mk.sample("g2", 2, mk.jpeg(2)))
    mk.tar(d / "b-mixed.tar", mk.sample("ok1", 0, mk.jpeg(3)) + [("../evil.jpg", mk.jpeg(4))]
           + [("lnk.jpg", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})] + mk.sample("ok2", 1, mk.jpeg(5))
           + [("ok1.cls", b"4")] + [("noimg.txt", b"x")])
    raw = mk.tar_bytes(mk.sample("t1", 1, mk.jpeg(6)) + mk.sample("t2", 2, mk.jpeg(7, size=(32, 32))))
    cut = raw.index(b"t2.jpg") + 512 + 100  # inside t2's image data
    (d / "c-truncated.tar").write_bytes(raw[:cut])
    (d / "d-empty.tar").write_bytes(b"")
    return str(d)


def test_bad_input_counted_by_reason(tmp_path, mk):
    d = bad_dataset(tmp_path, mk)
    r = export(d, ExportConfig(out=str(tmp_path / "out")))
    assert r["samples"] == 5  # g1 g2 ok1 ok2 t1
    assert r["skipped"] == {"unsafe_name": 1, "not_regular_file": 1, "duplicate_key": 1, "no_image": 1,
                            "truncated_tar": 1}
    assert {e["shard"]: e["reason"] for e in r["shard_errors"]} == {"c-truncated.tar": "truncated_tar",
                                                                     "d-empty.tar": "not_tar"}
    for name, c in r["shards"].items():
        assert c["seen"] == c["kept"] + c["skipped"], name
    assert r["shards"]["b-mixed.tar"] == {"seen": 6, "kept": 2, "skipped": 4}
    assert any("../evil.jpg" in e for e in r["errors"])
    idx = json.load(open(tmp_path / "out" / "index.json"))
    assert idx["skipped"] == r["skipped"] and idx["samples"] == 5


def test_bad_input_raise_names_file_and_member(tmp_path, mk):
    d = bad_dataset(tmp_path, mk)
    out = str(tmp_path / "out")
    with pytest.raises(SourceError) as e:
        export(d, ExportConfig(out=out, on_error="raise"))
    assert "b-mixed.tar" in str(e.value) and "'../evil.jpg'" in str(e.value)
    assert not os.path.exists(os.path.join(out, "index.json"))
    assert not shards_of(out)


def test_stale_manifest_location(data, tmp_path, fresh_data):
    m = str(tmp_path / "m.parquet")
    build_manifest(fresh_data.wds_dir, m)
    shard = sorted(glob.glob(os.path.join(fresh_data.wds_dir, "*.tar")))[1]
    raw = open(shard, "rb").read()
    with open(shard, "wb") as f:  # the shard was rewritten since the manifest was made
        f.write(raw[:5000])
    r = export(m, ExportConfig(out=str(tmp_path / "out")))
    assert r["samples"] < 24 and r["samples"] + sum(r["skipped"].values()) == 24
    assert set(r["skipped"]) <= {"truncated_tar", "stale_location"}
    with pytest.raises(SourceError, match="demo-000001.tar"):
        export(m, ExportConfig(out=str(tmp_path / "out2"), on_error="raise"))


def test_config_validation(data, tmp_path):
    for bad in ({"to": "zip"}, {"shard_size": 0}, {"max_shard_bytes": 10}, {"on_error": "ignore"}, {"prefix": "../x"}):
        with pytest.raises(ConfigError):
            export(data.wds_dir, ExportConfig(out=str(tmp_path / "o"), **bad))
    assert not os.path.exists(tmp_path / "o")


def test_hand_edited_manifest_with_unsafe_key(data, tmp_path):
    m = manifest_of(data, tmp_path)
    t, meta = read_manifest(m)
    keys = t.column("key").to_pylist()
    keys[3] = "../../etc/" + keys[3]
    t = t.set_column(t.column_names.index("key"), "key", pa.array(keys))
    write_parquet_atomic(t, m, meta)
    out = str(tmp_path / "out")
    with pytest.raises(Incomplete, match=r"23 samples written, 1 sample left out \(unsafe_name=1\)"):
        export(m, ExportConfig(out=out), allow_missing=False)  # written, then reported (the CLI's default: exit 8)
    r = export(m, ExportConfig(out=out))
    assert r["samples"] == 23 and r["skipped"] == {"unsafe_name": 1}  # one row refused, the others still exported
    assert all(".." not in s["__key__"] for s in wds_read(out))
