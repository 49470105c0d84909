"""Exports read by the tools people load them with: webdataset + torch DataLoader workers, torchvision's
ImageFolder, parquet joined back to the manifest, and dataprune's own sources."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.config import ExportConfig
from dataprune.demo import make_demo
from dataprune.export import export, writer_class
from dataprune.manifest import build_manifest
from dataprune.sources import open_source
from dataprune.tables import read_manifest, write_parquet_atomic

N = 200


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """200 demo samples in 4 shards, its manifest, and every sample's members by key."""
    root = tmp_path_factory.mktemp("loaders")
    data = str(root / "data")
    make_demo(data, n=N, shard_size=50, image_size=8, seed=2)
    m = str(root / "all.parquet")
    build_manifest(data, m)
    src = open_source(data)
    samples = {s.key: s for sh in src.list_shards() for s in src.iter_samples(sh)}
    return data, m, samples, src.classes


def without_class(m: str, out: str, label: int) -> str:
    """The manifest less every row of one class (a selection that lost the class)."""
    t, meta = read_manifest(m)
    write_parquet_atomic(t.filter(pa.compute.not_equal(t.column("label"), label)), out, meta)
    return out


def _worker_of(sample: dict) -> dict:
    import torch.utils.data

    return {**sample, "worker": torch.utils.data.get_worker_info().id}


# ------------------------------------------------------------------------------- shard sizes

def test_default_shard_plan():
    cfg = ExportConfig()
    for n in [1, 5, 15, 16, 17, 31, 100, 200, 1000, 159_999, 160_000, 160_001, 1_234_567]:
        q, r = cfg.shard_plan(n)
        shards = [q + (i < r) for i in range(n // q + 1)]
        sizes = []
        left = n
        for s in shards:
            if left <= 0:
                break
            sizes.append(min(s, left))
            left -= sizes[-1]
        assert sum(sizes) == n and max(sizes) <= 10_000 and max(sizes) - min(sizes) <= 1, n
        assert len(sizes) == (n if n < 16 else max(16, -(-n // 10_000))), n
    assert ExportConfig(shard_size=7).shard_plan(200) == (7, 0)  # given: obeyed as it is


@pytest.mark.parametrize("route", ["dataset", "manifest"])
def test_wds_export_feeds_every_dataloader_worker(demo, tmp_path, route):
    import torch.utils.data
    import webdataset as wds

    data, m, samples, _ = demo
    out = str(tmp_path / "out")
    r = export(data if route == "dataset" else m, ExportConfig(out=out))
    assert r["samples"] == N and len(r["files"]) == 16 and r["shard_size_auto"] and r["shard_size"] == 13
    assert sorted(f["samples"] for f in r["files"]) == [12] * 8 + [13] * 8 and r["notes"] == []
    urls = sorted(glob.glob(os.path.join(out, "*.tar")))
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(_worker_of)
    got = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert Counter(s["__key__"] for s in got) == Counter(samples.keys())  # every sample once
    assert Counter(s["worker"] for s in got) == {0: N // 2, 1: N // 2}  # 8 shards each: both workers busy alike
    for s in got:  # every member, byte for byte
        assert {k: v for k, v in s.items() if not k.startswith("__") and k != "worker"} == samples[s["__key__"]].members


def test_few_shards_are_noted(demo, tmp_path):
    data, m, _, _ = demo
    r = export(m, ExportConfig(out=str(tmp_path / "a"), shard_size=100))
    assert len(r["files"]) == 2
    assert r["notes"] == ["wrote 2 shards (--shard-size 100): a DataLoader with more than 2 workers leaves the extra "
                          "workers idle (each worker reads whole shards)"]
    t, meta = read_manifest(m)
    tiny = str(tmp_path / "tiny.parquet")
    write_parquet_atomic(t.slice(0, 5), tiny, meta)
    r = export(tiny, ExportConfig(out=str(tmp_path / "b")))
    assert [f["samples"] for f in r["files"]] == [1] * 5 and "too few samples" in r["notes"][0]
    r = export(tiny, ExportConfig(to="list", out=str(tmp_path / "c")))
    assert r["notes"] == []  # not a sharded format


def test_max_shard_bytes_with_the_default_shard_size(demo, tmp_path):
    data, m, samples, _ = demo
    out = str(tmp_path / "out")
    r = export(m, ExportConfig(out=out, max_shard_bytes=20_480))  # tars are whole 10 KiB records
    sizes = [os.path.getsize(p) for p in sorted(glob.glob(os.path.join(out, "*.tar")))]
    assert all(s <= 20_480 for s in sizes) and len(sizes) > 16 and all(f["samples"] <= 13 for f in r["files"])
    assert any(f["samples"] < 12 for f in r["files"])  # cut by bytes before the count
    assert sum(f["samples"] for f in r["files"]) == N


def test_parquet_default_files_and_provenance(demo, tmp_path):
    data, m, samples, classes = demo
    out = str(tmp_path / "out")
    r = export(m, ExportConfig(to="parquet", out=out))
    files = sorted(glob.glob(os.path.join(out, "*.parquet")))
    assert len(files) == 16 and r["notes"] == []
    t = pa.concat_tables([pq.read_table(p) for p in files])
    assert t.schema.field("sample_id").type == pa.uint64() and t.schema.field("shard").type == pa.string()
    assert t.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert t.column_names[:3] == ["key", "image", "label"]
    mt, _ = read_manifest(m)
    want = {sid: (sh, k, lb) for sid, sh, k, lb in zip(*(mt.column(c).to_pylist() for c in ("sample_id", "shard", "key", "label")))}
    got = {sid: (sh, k, lb) for sid, sh, k, lb in zip(*(t.column(c).to_pylist() for c in ("sample_id", "shard", "key", "label")))}
    assert got == want  # joins back to the manifest (and score tables) on sample_id, or on (shard, key)
    feats = json.loads(pq.read_schema(files[0]).metadata[b"huggingface"])["info"]["features"]
    assert feats["label"] == {"names": classes, "_type": "ClassLabel"} and feats["image"] == {"_type": "Image"}
    assert feats["sample_id"] == {"dtype": "uint64", "_type": "Value"} and feats["shard"] == {"dtype": "string", "_type": "Value"}
    # the whole-dataset route carries the same ids
    r2 = export(data, ExportConfig(to="parquet", out=str(tmp_path / "out2")))
    t2 = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(str(tmp_path / "out2" / "*.parquet")))])
    assert sorted(t2.column("sample_id").to_pylist()) == sorted(want) and r2["samples"] == N


# ------------------------------------------------------------------------------ image folders

def test_folder_export_keeps_labels_when_a_class_is_lost(demo, tmp_path):
    from torchvision.datasets import ImageFolder

    data, m, samples, classes = demo
    lost = 3
    sel = without_class(m, str(tmp_path / "sel.parquet"), lost)
    out = str(tmp_path / "out")
    r = export(sel, ExportConfig(to="folder", out=out))
    assert r["empty_classes"] == [classes[lost]] and r["label_order_kept"]
    assert any("allow_empty=True" in n for n in r["notes"])
    assert open(os.path.join(out, "classes.txt"), encoding="utf-8").read().splitlines() == classes
    ds = ImageFolder(out, allow_empty=True)
    assert ds.classes == classes
    kept = {k: s for k, s in samples.items() if s.label != lost}
    assert len(ds.samples) == len(kept) == r["samples"]
    for path, label in ds.samples:
        assert label == kept[os.path.splitext(os.path.basename(path))[0]].label
    # dataprune's own folder source reads the same labels back (`dataprune info OUT`)
    back = open_source(out)
    assert back.format == "folder"
    got = {s.key.rsplit("/", 1)[-1]: s.label for sh in back.list_shards() for s in back.iter_samples(sh)}
    assert got == {k: s.label for k, s in kept.items()} and back.classes == classes


def test_folder_class_names_that_do_not_sort_in_label_order(tmp_path, mk):
    from torchvision.datasets import ImageFolder

    names = ["zebra", "ant", "classes.txt", "", "a/b", "a_b"]  # unsorted, one of our names, empty, two that clean up alike
    d = tmp_path / "in"
    members = []
    for i in range(len(names)):
        if i != 1:  # "ant" loses every sample
            members += mk.sample(f"s{i}", i, mk.jpeg(i))
    mk.tar(d / "a.tar", members)
    (d / "classes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    out = str(tmp_path / "out")
    r = export(str(d), ExportConfig(to="folder", out=out))
    assert r["class_dirs"] == ["000_zebra", "001_ant", "002_classes.txt", "003", "004_a_b", "005_a_b"]
    assert r["empty_classes"] == ["001_ant"] and r["label_order_kept"]
    ds = ImageFolder(out, allow_empty=True)
    assert [(os.path.basename(p), lbl) for p, lbl in sorted(ds.samples)] == [(f"s{i}.jpg", i) for i in (0, 2, 3, 4, 5)]
    assert open(os.path.join(out, "classes.txt"), encoding="utf-8").read() == "\n".join(names) + "\n"
    # a rerun replaces it exactly (the empty folder is recorded as ours)
    before = sorted(os.walk(out))
    r2 = export(str(d), ExportConfig(to="folder", out=out))
    assert r2["class_dirs"] == r["class_dirs"] and sorted(os.walk(out)) == before
    # dataprune reads the export back with the original names (classes.txt describes these directories)
    src = open_source(out)
    got = {s.key: s.label for sh in src.list_shards() for s in src.iter_samples(sh)}
    assert src.classes == names and {k.rsplit("/", 1)[1]: v for k, v in got.items()} == {f"s{i}": i for i in (0, 2, 3, 4, 5)}


def test_a_classes_txt_that_does_not_describe_the_folders_is_not_applied(tmp_path, mk):
    d = tmp_path / "f"
    for c in ("cat", "dog"):
        (d / c).mkdir(parents=True)
        (d / c / "x.jpg").write_bytes(mk.jpeg(1))
    (d / "classes.txt").write_text("bird\nfish\n")  # same count, other meaning
    src = open_source(str(d))
    src.list_shards()
    assert src.classes == ["cat", "dog"]


# ------------------------------------------------------------------------------------ --to name

def test_webdataset_is_an_alias_of_wds(demo, tmp_path, mk):
    data, m, _, _ = demo
    assert ExportConfig(to="webdataset").to == "wds" and writer_class("webdataset") is writer_class("wds")
    r = export(m, ExportConfig(to="webdataset", out=str(tmp_path / "a"), shard_size=100))
    assert r["format"] == "wds" and len(r["files"]) == 2
    res = mk.cli_fast("export", m, "--to", "webdataset", "--out", tmp_path / "b", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"format": "wds"' in res.stdout and len(glob.glob(str(tmp_path / "b" / "*.tar"))) == 16
