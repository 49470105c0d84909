"""Contract tests over the writer registry: register a writer (and a reader for its output below)
and these run it through the export driver."""

from __future__ import annotations

import glob
import json
import os
import re

import pyarrow.parquet as pq
import pytest

import dataprune.export as export_mod
from dataprune.errors import ConfigError
from dataprune.export import ExportConfig, ExportStats, Writer, export, list_writers, writer_class
from dataprune.export.base import INDEX
from dataprune.export.outdir import RECORD, owned_names
from dataprune.outlock import LOCK_NAME
from dataprune.manifest import build_manifest
from dataprune.sources import open_source

# What the driver itself writes to index.json; a writer's index_fields() adds other keys only.
COMMON = {"format", "samples", "bytes", "files", "skipped", "errors", "shard_errors", "shards", "renamed_keys", "classes",
          "source", "shuffle", "seed", "shard_size", "shard_size_auto", "max_shard_bytes", "manifest", "dataset", "notes", RECORD}


# ------------------------------------------------------------------------- readers, one per writer

def read_wds(out: str, classes) -> dict:
    import webdataset as wds

    urls = sorted(glob.glob(os.path.join(out, "*.tar")))
    return {s["__key__"]: (int(s["cls"]), s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)}


def read_parquet(out: str, classes) -> dict:
    got = {}
    for p in sorted(glob.glob(os.path.join(out, "*.parquet"))):
        for row in pq.read_table(p).to_pylist():
            got[row["key"]] = (row["label"], row["image"]["bytes"])
    return got


def read_folder(out: str, classes) -> dict:
    got = {}
    for c in sorted(os.listdir(out)):
        if os.path.isdir(os.path.join(out, c)):
            for f in sorted(os.listdir(os.path.join(out, c))):
                with open(os.path.join(out, c, f), "rb") as fh:
                    got[os.path.splitext(f)[0]] = (classes.index(c), fh.read())
    return got


def read_list(out: str, classes) -> dict:
    with open(os.path.join(out, "keys.txt"), encoding="utf-8") as f:
        return {key: shard for shard, key in (line.rstrip("\n").split("\t") for line in f)}


def read_jsonl(out: str, classes) -> dict:
    import base64

    got = {}
    for p in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
        with open(p, encoding="utf-8") as f:
            for doc in map(json.loads, f):  # image samples: their members in base64
                got[doc["id"]] = (doc.get("label"), base64.b64decode(doc["members"]["jpg"]))
    return got


READERS = {"wds": read_wds, "parquet": read_parquet, "folder": read_folder, "list": read_list, "jsonl": read_jsonl}


def read_back(name: str, out: str, classes) -> dict:
    if name not in READERS:
        pytest.fail(f"writer {name!r} is registered but this test has no reader for its output: add one to READERS")
    return READERS[name](out, classes)


def expected(name: str, data) -> dict:
    if name == "list":  # key -> the input shard it came from
        src = open_source(data.wds_dir)
        return {s.key: s.shard for sh in src.list_shards() for s in src.iter_samples(sh)}
    return dict(data.truth)


@pytest.fixture(scope="module")
def manifest(data, tmp_path_factory) -> str:
    m = str(tmp_path_factory.mktemp("writers") / "m.parquet")
    build_manifest(data.wds_dir, m)
    return m


def tree(out: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs if f != LOCK_NAME)


# ------------------------------------------------------------------------------------------ tests

def test_registry_names_and_order():
    names = list_writers()
    assert names[:4] == ["wds", "parquet", "folder", "list"]  # FORMATS order, and --to's error message
    assert export_mod.FORMATS == tuple(names)
    for name in names:
        cls = writer_class(name)
        assert issubclass(cls, Writer) and cls is not Writer and cls.name == name
    with pytest.raises(ConfigError) as e:
        writer_class("zip")
    assert str(e.value) == f"--to must be one of {', '.join(names)}, not 'zip'"


@pytest.mark.parametrize("route", ["stream", "manifest", "shuffle"])
@pytest.mark.parametrize("name", list_writers())
def test_every_writer_exports_and_reads_back(data, manifest, tmp_path, name, route):
    out = str(tmp_path / "out")
    src = data.wds_dir if route == "stream" else manifest
    r = export(src, ExportConfig(to=name, out=out, shard_size=7, shuffle=route == "shuffle", seed=1))
    # index.json: written last, the same as the result, and its counts add up
    with open(os.path.join(out, INDEX), encoding="utf-8") as f:
        idx = json.load(f)
    assert idx == {k: v for k, v in r.items() if k not in ("seconds", "processes")}
    assert all(isinstance(n, str) and "\n" not in n for n in r["notes"])
    assert idx["format"] == name and idx["samples"] == len(data.truth) == 24
    assert idx["skipped"] == {} and idx["shard_errors"] == [] and idx["errors"] == []
    assert sum(f["samples"] for f in idx["files"]) == idx["samples"]
    assert sum(c["kept"] for c in idx["shards"].values()) == idx["samples"]
    assert all(c["seen"] == c["kept"] + c["skipped"] for c in idx["shards"].values())
    assert idx["bytes"] == sum(sum(len(m) for m in s.members.values()) for s in _samples(data.wds_dir))
    # the output reads back as what went in
    assert read_back(name, out, data.classes) == expected(name, data)
    # nothing with a temporary name is left, and the next export can tell every top-level name is ours: the
    # output lock, index.json, and what its record lists (named like the writer's outputs, as recorded)
    assert not [p for p in tree(out) if p.endswith(".tmp")]
    cls = writer_class(name)
    pats = [re.compile(p.format(prefix=re.escape("pruned"))) for p in cls.outputs]
    listed = {e["name"] for e in idx[RECORD]["entries"]}
    assert idx[RECORD]["by"] == "dataprune export" and idx[RECORD]["format"] == name
    for e in os.listdir(out):
        assert e in (INDEX, LOCK_NAME) or (e in listed and any(p.fullmatch(e) for p in pats)), e
    assert owned_names(out) == set(os.listdir(out))


def _samples(path: str):
    src = open_source(path)
    return [s for sh in src.list_shards() for s in src.iter_samples(sh)]


@pytest.mark.parametrize("name", list_writers())
def test_every_writer_replaces_any_earlier_export(data, manifest, tmp_path, name):
    """An export into a directory that holds another writer's export leaves only its own files."""
    clean, out = str(tmp_path / "clean"), str(tmp_path / "out")
    export(manifest, ExportConfig(to=name, out=clean, shard_size=5))
    for other in list_writers():
        export(manifest, ExportConfig(to=other, out=out, shard_size=5))
    export(manifest, ExportConfig(to=name, out=out, shard_size=5))
    assert tree(out) == tree(clean)


@pytest.mark.parametrize("name", list_writers())
def test_aborted_writer_leaves_no_files(data, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    samples = [s for s in _samples(data.wds_dir) if s.ok][:12]
    cfg = ExportConfig(to=name, out=str(out), shard_size=5)
    w = writer_class(name)(cfg, data.classes, ExportStats())
    w.abort()  # before anything was added
    assert os.listdir(out) == []
    w = writer_class(name)(cfg, data.classes, ExportStats())
    for s in samples:
        assert w.add(s.shard, s.key, s.label, s.members, None) is not False
    w.abort()
    assert os.listdir(out) == [], os.listdir(out)


@pytest.mark.parametrize("name", list_writers())
def test_closed_writer_describes_its_files(data, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    cfg = ExportConfig(to=name, out=str(out), shard_size=5)
    w = writer_class(name)(cfg, data.classes, ExportStats())
    samples = [s for s in _samples(data.wds_dir) if s.ok][:12]
    for s in samples:
        w.add(s.shard, s.key, s.label, s.members, None)
    w.close()
    assert sum(f["samples"] for f in w.files) == len(samples)
    assert all(os.path.exists(out / f["name"]) for f in w.files)
    assert not set(w.index_fields()) & COMMON  # a writer adds to the index, never overwrites the driver's fields
    assert not [p for p in tree(str(out)) if p.endswith(".tmp")]
