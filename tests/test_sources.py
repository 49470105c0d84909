"""Every source: shards, keys, labels, bytes, locations; stable ids; fetch by location; bad input."""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.errors import ConfigError, SourceError
from dataprune.ids import sample_id
from dataprune.sources import detect_format, open_source


def read_all(src):
    """(samples, shard errors) of every shard."""
    out, errors = [], []
    for sh in src.list_shards():
        try:
            out.extend(src.iter_samples(sh))
        except SourceError as e:
            errors.append(e)
    return out, errors


def fetch_back(src, s):
    (got,) = list(src.fetch(s.loc_path, [(s.key, s.loc_offset, s.loc_size)]))
    assert got.key == s.key
    return got.members


# ------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("attr, fmt", [("wds_dir", "wds"), ("wds_brace", "wds"), ("wds_list", "wds"), ("wds_tar", "wds"),
                                       ("wds_gz", "wds"), ("folder", "folder"), ("flat", "folder"),
                                       ("hf_parquet", "parquet"), ("bytes_parquet", "parquet")])
def test_detect_format(data, attr, fmt):
    assert detect_format(getattr(data, attr)) == fmt


@pytest.mark.parametrize("attr", ["wds_dir", "wds_brace", "wds_list", "wds_gz"])
def test_wds_samples_match_truth(data, attr):
    src = open_source(getattr(data, attr))
    shards = src.list_shards()
    assert len(shards) == 3 and [s.index for s in shards] == [0, 1, 2]
    samples, errors = read_all(src)
    assert not errors and all(s.ok for s in samples)
    assert {s.key: (s.label, s.image) for s in samples} == data.truth
    assert src.classes == data.classes
    assert all(s.image_ext == "jpg" and set(s.members) == {"jpg", "cls"} for s in samples)
    assert [s.shard for s in samples][:10] == [shards[0].name] * 10


def test_tar_locations_are_member_blocks(data, mk):
    src = open_source(data.wds_dir)
    sh = src.list_shards()[1]
    raw = open(sh.path, "rb").read()
    samples = list(src.iter_samples(sh))
    pos = 0
    for s in samples:
        assert s.loc_path == sh.path and s.loc_offset == pos and s.loc_size % 512 == 0
        region = raw[s.loc_offset : s.loc_offset + s.loc_size]
        with tarfile.open(fileobj=__import__("io").BytesIO(region + b"\0" * 1024)) as tf:
            names = tf.getnames()
        assert names == [f"{s.key}.jpg", f"{s.key}.cls"]
        pos += s.loc_size


def test_sample_id_stable_across_spellings(data):
    ids = {}
    for name, path in data.spellings().items():
        samples, _ = read_all(open_source(path))
        ids[name] = {(s.shard, s.key): s.sample_id for s in samples}
    assert ids["dir"] == ids["brace"] == ids["list"]
    # one tar named alone gives the ids it has inside the directory
    single, _ = read_all(open_source(data.wds_tar))
    assert {(s.shard, s.key): s.sample_id for s in single}.items() <= ids["dir"].items()
    # ids are scope+key hashes: keys repeat across shards in real data, ids must not
    assert sample_id("a.tar", "k") != sample_id("b.tar", "k")
    assert all(sid == sample_id(shard, key) for (shard, key), sid in ids["dir"].items())


@pytest.mark.parametrize("attr", ["wds_dir", "wds_gz", "folder", "flat", "hf_parquet", "bytes_parquet"])
def test_fetch_by_location_gives_identical_members(data, attr):
    opts = {"image_column": "picture", "label_column": "target", "key_column": "id"} if attr == "bytes_parquet" else {}
    src = open_source(getattr(data, attr), **opts)
    samples, errors = read_all(src)
    assert not errors and len(samples) == len(data.truth)
    for s in samples:
        assert fetch_back(src, s) == s.members
    # many rows of one file in one call, sorted by offset (what export does)
    by_path: dict[str, list] = {}
    for s in samples:
        by_path.setdefault(s.loc_path, []).append(s)
    for path, group in by_path.items():
        group.sort(key=lambda s: s.loc_offset)
        got = list(src.fetch(path, [(s.key, s.loc_offset, s.loc_size) for s in group]))
        assert [g.members for g in got] == [s.members for s in group]


def test_gz_offsets_are_in_the_decompressed_stream(data):
    plain = {(s.key): (s.loc_offset, s.loc_size) for s in read_all(open_source(data.wds_dir))[0]}
    gz = {(s.key): (s.loc_offset, s.loc_size) for s in read_all(open_source(data.wds_gz))[0]}
    assert plain == gz


def test_image_folder_classes_like_torchvision(data):
    from torchvision.datasets.folder import find_classes

    src = open_source(data.folder)
    shards = src.list_shards()
    classes, class_to_idx = find_classes(data.folder)
    assert src.classes == classes
    samples, _ = read_all(src)
    assert {s.key.split("/", 1)[1]: (s.label, s.image) for s in samples} == data.truth
    for s in samples:
        assert s.label == class_to_idx[s.key.split("/")[0]]
        assert s.loc_path == os.path.join(data.folder, s.key + ".jpg") and s.loc_offset == 0 and s.loc_size == len(s.image)
    # virtual shards: ids survive re-cutting
    small = open_source(data.folder, shard_files=5)
    assert len(small.list_shards()) == 5 and len(shards) == 1
    assert {s.sample_id for s in read_all(small)[0]} == {s.sample_id for s in samples}


def test_flat_folder_is_unlabelled(data):
    src = open_source(data.flat, shard_files=7)
    samples, _ = read_all(src)
    assert src.classes is None and len(src.list_shards()) == 4
    assert {s.key: s.image for s in samples} == {k: v[1] for k, v in data.truth.items()}
    assert all(s.label is None and set(s.members) == {"jpg"} for s in samples)


def test_hf_parquet(data):
    src = open_source(data.hf_parquet)
    shards = src.list_shards()
    assert [s.name for s in shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    samples, _ = read_all(src)
    assert src.classes == data.classes
    rows = sorted(data.truth.items())
    assert [(s.label, s.image) for s in samples] == [v for _, v in rows]
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(15)] + [f"{i:09d}" for i in range(9)]
    assert [s.loc_offset for s in samples[:3]] == [0, 1, 2]
    assert len({s.sample_id for s in samples}) == 24  # row keys repeat across files, ids do not
    assert all(os.path.isabs(s.loc_path) for s in samples)


def test_plain_parquet_columns(data, tmp_path):
    src = open_source(data.bytes_parquet, image_column="picture", label_column="target", key_column="id")
    samples, _ = read_all(src)
    assert {s.key: (s.label, s.image) for s in samples} == data.truth
    # detection: the key column "id" by name, the only binary column as the image, no label column
    auto, _ = read_all(open_source(data.bytes_parquet))
    assert {s.key: (s.label, s.image) for s in auto} == {k: (None, v[1]) for k, v in data.truth.items()}
    with pytest.raises(ConfigError, match="nope"):
        open_source(data.bytes_parquet, image_column="nope").list_shards()
    two = tmp_path / "two.parquet"
    pq.write_table(pa.table({"a": pa.array([b"1"], pa.binary()), "b": pa.array([b"2"], pa.binary())}), two)
    with pytest.raises(ConfigError, match="no image column"):
        open_source(str(two)).list_shards()


def test_relative_paths_become_absolute(data, monkeypatch):
    monkeypatch.chdir(data.root)
    for rel in ("wds", "hf", "plain.parquet", "folder", "lists/shards.txt"):
        src = open_source(rel)
        samples, _ = read_all(src)
        assert all(os.path.isabs(s.loc_path) for s in samples), rel
        assert os.path.isabs(src.spec()["path"])


# ------------------------------------------------------------------------------------- bad input

def test_pipe_urls_refused(tmp_path):
    with pytest.raises(ConfigError, match="pipe:"):
        open_source("pipe:curl -s http://x/a.tar").list_shards()
    lst = tmp_path / "list.txt"
    lst.write_text("pipe:cat a.tar\n")
    with pytest.raises(ConfigError, match="pipe:"):
        open_source(str(lst)).list_shards()


def write_bad(tmp_path, mk, members, name="bad.tar"):
    d = tmp_path / "ds"
    mk.tar(d / "good.tar", mk.sample("g1", 1, mk.jpeg(1)) + mk.sample("g2", 2, mk.jpeg(2)))
    mk.tar(d / name, members)
    return str(d)


@pytest.mark.parametrize("case, reason, bad_count", [
    ("absolute", "unsafe_name", 1), ("dotdot", "unsafe_name", 1), ("symlink", "not_regular_file", 1),
    ("hardlink", "not_regular_file", 1), ("device", "not_regular_file", 1), ("dup_adjacent", "duplicate_key", 1),
    ("dup_later", "duplicate_key", 1), ("no_image", "no_image", 1), ("bad_label", "bad_label", 1),
])
def test_bad_members_are_counted_skips(tmp_path, mk, case, reason, bad_count):
    ok1 = mk.sample("ok1", 0, mk.jpeg(3))
    ok2 = mk.sample("ok2", 1, mk.jpeg(4))
    bad = {
        "absolute": [("/etc/evil.jpg", mk.jpeg(5))],
        "dotdot": [("a/../../evil.jpg", mk.jpeg(5))],
        "symlink": [("s.jpg", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"})],
        "hardlink": [("h.jpg", {"type": tarfile.LNKTYPE, "linkname": "ok1.jpg"})],
        "device": [("d.jpg", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})],
        "dup_adjacent": [("ok1.jpg", mk.jpeg(6))],  # ok1.jpg twice in a row: same sample, same extension
        "dup_later": ok2[:0] + [("ok1.cls", b"7")],
        "no_image": [("txt1.txt", b"hello"), ("txt1.cls", b"3")],
        "bad_label": [("bl.jpg", mk.jpeg(7)), ("bl.cls", b"cat")],
    }[case]
    if case == "dup_later":
        members = ok1 + ok2 + bad
    elif case == "dup_adjacent":
        members = ok1 + bad + ok2
    else:
        members = ok1 + bad + ok2
    d = write_bad(tmp_path, mk, members)
    src = open_source(d)
    samples, errors = read_all(src)
    assert not errors
    by_shard = Counter(s.shard for s in samples)
    bad_samples = [s for s in samples if not s.ok]
    assert Counter(s.status for s in bad_samples) == {reason: bad_count}
    for s in bad_samples:
        assert "bad.tar" in s.error  # names the file ...
        assert s.image is None or s.status == "bad_label"
    ok_keys = {s.key for s in samples if s.ok and s.shard == "bad.tar"}
    expected_ok = {"ok1", "ok2"} - ({"ok1"} if case == "dup_adjacent" else set())
    assert ok_keys == expected_ok
    # seen = kept + skipped, per shard
    assert by_shard["bad.tar"] == len(ok_keys) + len(bad_samples)
    assert by_shard["good.tar"] == 2


def test_member_name_in_error_messages(tmp_path, mk):
    d = write_bad(tmp_path, mk, mk.sample("ok", 0, mk.jpeg(1)) + [("x/../../evil.jpg", b"1")])
    (bad,) = [s for s in read_all(open_source(d))[0] if not s.ok]
    assert "'x/../../evil.jpg'" in bad.error and os.path.join(d, "bad.tar") in bad.error


@pytest.mark.parametrize("damage, reason", [("truncate", "truncated_tar"), ("zero", "not_tar"), ("text", "not_tar"),
                                            ("gz_truncate", None), ("gz_garbage", None)])
def test_damaged_shards_keep_samples_before_the_damage(tmp_path, mk, damage, reason):
    members = []
    for i in range(6):
        members += mk.sample(f"k{i}", i % 3, mk.jpeg(i, size=(16, 16)))
    d = tmp_path / "ds"
    raw = mk.tar_bytes(members)
    name = "bad.tar.gz" if damage.startswith("gz") else "bad.tar"
    if damage == "truncate":
        payload = raw[: len(raw) // 2 + 100]
    elif damage == "zero":
        payload = b""
    elif damage == "text":
        payload = b"this is not a tar file\n" * 40
    elif damage == "gz_truncate":
        payload = gzip.compress(raw, mtime=0)
        payload = payload[: len(payload) // 2]
    else:
        payload = b"\x1f\x8b\x08\x00garbage" * 30
    os.makedirs(d)
    (d / name).write_bytes(payload)
    mk.tar(d / "good.tar", mk.sample("g", 1, mk.jpeg(9)))
    src = open_source(str(d))
    shards = {s.name: s for s in src.list_shards()}
    assert set(shards) == {name, "good.tar"}
    got = []
    with pytest.raises(SourceError) as e:
        for s in src.iter_samples(shards[name]):
            got.append(s)
    err = e.value
    assert name in str(err) and err.path == shards[name].path
    if reason:
        assert err.reason == reason
    assert "Traceback" not in str(err)
    ok = [s for s in got if s.ok]
    if damage in ("truncate", "gz_truncate"):
        assert len(ok) >= 1 and [s.key for s in ok] == [f"k{i}" for i in range(len(ok))]
        # the sample the cut went through is reported as a skip, not silently lost
        assert [s.status for s in got if not s.ok] == [err.reason] == ["truncated_tar"]
    assert list(src.iter_samples(shards["good.tar"]))[0].ok


def test_shard_list_errors_name_the_list(tmp_path):
    lst = tmp_path / "shards.txt"
    lst.write_text("missing-000000.tar\n")
    with pytest.raises(SourceError) as e:
        open_source(str(lst)).list_shards()
    assert "missing-000000.tar" in str(e.value) and "shards.txt" in str(e.value)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(SourceError) as e:
        open_source(str(binary)).list_shards()
    assert "blob.bin" in str(e.value)


def test_tar_without_tar_suffix_is_read_as_a_tar(tmp_path, mk):
    p = tmp_path / "shard.bin"
    p.write_bytes(mk.tar_bytes(mk.sample("a", 1, mk.jpeg(1))))
    samples, errors = read_all(open_source(str(p)))
    assert not errors and [s.key for s in samples] == ["a"]


def test_parquet_without_footer(tmp_path, data):
    d = tmp_path / "pq"
    shutil.copytree(data.hf_parquet, d)
    bad = d / "train-00000-of-00002.parquet"
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) - 200])  # footer and magic gone
    src = open_source(str(d))
    shards = src.list_shards()  # the other file still gives the schema
    assert len(shards) == 2
    with pytest.raises(SourceError) as e:
        list(src.iter_samples(shards[0]))
    assert e.value.reason == "bad_parquet" and "train-00000-of-00002.parquet" in str(e.value)
    assert len(list(src.iter_samples(shards[1]))) == 9
    # the only file without footer: a clear error, not a traceback
    with pytest.raises(SourceError, match="train-00000-of-00002.parquet"):
        open_source(str(bad)).list_shards()


def test_parquet_bad_rows(tmp_path, mk):
    p = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"key": ["a", "b", "a", "../x", "c"],
                             "image": pa.array([mk.jpeg(1), None, mk.jpeg(2), mk.jpeg(3), mk.jpeg(4)], pa.binary()),
                             "label": ["1", "2", "3", "4", "dog"]}), p)
    samples, _ = read_all(open_source(str(p)))
    assert [s.status for s in samples] == ["ok", "no_image", "duplicate_key", "unsafe_name", "bad_label"]
    assert all(str(p) in s.error and "row" in s.error for s in samples[1:])


def test_folder_with_symlink_loop(tmp_path, mk):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(mk.jpeg(1))
    os.symlink("..", root / "cat" / "loop")  # cat/loop -> imgs: walking it would never end
    samples, _ = read_all(open_source(str(root)))
    assert [s.key for s in samples] == ["cat/a"]


def test_fsspec_urls(data, tmp_path):
    import fsspec  # the optional 'remote' extra (in the test extra)

    fs = fsspec.filesystem("memory")
    for name in ("demo-000000.tar", "demo-000001.tar"):
        fs.pipe(f"/bucket/{name}", open(os.path.join(data.wds_dir, name), "rb").read())
    src = open_source("memory://bucket/demo-{000000..000001}.tar")
    samples, errors = read_all(src)
    assert not errors and len(samples) == 20
    assert {s.key: (s.label, s.image) for s in samples} == {k: v for k, v in data.truth.items() if int(k) < 20}
    local = {(s.shard, s.key): s.sample_id for s in read_all(open_source(data.wds_dir))[0]}
    assert all(local[(s.shard, s.key)] == s.sample_id for s in samples)  # same names -> same ids
    s = samples[13]
    assert fetch_back(src, s) == s.members
    from dataprune.export import ExportConfig, export
    from dataprune.manifest import build_manifest

    m = str(tmp_path / "m.parquet")
    build_manifest("memory://bucket/demo-{000000..000001}.tar", m)
    r = export(m, ExportConfig(out=str(tmp_path / "out")))
    assert r["samples"] == 20
