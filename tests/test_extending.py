"""docs/extending.md, run: every ``<!-- example: NAME -->`` python block of the doc is read out of the
file and executed here, end to end on small real datasets in tmp_path — a toy metric scored, selected
and exported; a toy writer, strategy and source used by export, select, info, manifest and score.

Registrations happen inside the tests only (the contract tests parametrize over the registries when
they are collected) and the ``run_example`` fixture puts every registry back as it was afterwards.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dataprune.engine import ScoreConfig, score
from dataprune.export import ExportConfig, ExportStats, export, list_writers, writer_class
from dataprune.export import WRITERS as _WRITERS
from dataprune.metrics import METRICS, get_metric, list_metrics
from dataprune.outlock import LOCK_NAME
from dataprune.select import config_for, list_strategies, plan_selection
from dataprune.select import STRATEGIES
from dataprune.sources import SOURCES, list_formats, open_source

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
EXAMPLE = re.compile(r"^<!-- example: ([\w-]+) -->\n```python\n(.*?)^```$", re.S | re.M)
NAMES = ["metric", "metric-use", "writer", "writer-use", "strategy", "strategy-use", "source", "source-use", "launcher"]
REGISTRATIONS = ["metric", "writer", "strategy", "source"]  # the blocks that register something
BEFORE = [list(r) for r in (METRICS, _WRITERS, STRATEGIES, SOURCES)]  # the registries as imported (built-ins only)


def examples() -> dict[str, tuple[int, str]]:
    """name -> (line of the block's first code line in the doc, code)."""
    text = DOC.read_text(encoding="utf-8")
    out = {}
    for m in EXAMPLE.finditer(text):
        assert m.group(1) not in out, f"example {m.group(1)!r} appears twice in {DOC.name}"
        out[m.group(1)] = (text.count("\n", 0, m.start(2)) + 1, m.group(2))
    return out


def wds_samples(out: str) -> dict[str, tuple[int, bytes]]:
    """key -> (label, image bytes) of exported WebDataset shards, read by the webdataset library."""
    import webdataset as wds

    urls = sorted(glob.glob(os.path.join(out, "*.tar")))
    assert urls, f"no shards in {out}"
    return {s["__key__"]: (int(s["cls"]), s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)}


def one_minus_max_softmax(checkpoint: Path, data: Path, mk) -> dict[str, float]:
    """key -> 1 - max softmax of a test_resnet proxy on the demo's 8-px images (native size: no resize)."""
    import timm
    import torch
    from safetensors.torch import load_file

    from dataprune.decode import decode_image

    model = timm.create_model("test_resnet", num_classes=10)
    model.load_state_dict(load_file(str(checkpoint)))
    model.eval()
    dc = timm.data.resolve_model_data_config(model)
    mean, std = (torch.tensor(dc[k]).view(1, 3, 1, 1) * 255 for k in ("mean", "std"))
    images = {n[:-4]: decode_image(b) for tar in sorted(glob.glob(str(data / "*.tar")))
              for n, b in mk.read_tar(tar).items() if n.endswith(".jpg")}
    x = (torch.from_numpy(np.stack(list(images.values()))).permute(0, 3, 1, 2).float() - mean) / std
    with torch.no_grad():
        p = model(x).softmax(1)
    return dict(zip(images, (1 - p.amax(1)).tolist()))


@pytest.fixture
def run_example():
    """``run_example(name, **names)``: execute one example block with ``names`` defined (tracebacks
    point at the doc's lines); every registry is restored when the test ends."""
    registries = [METRICS, _WRITERS, STRATEGIES, SOURCES]
    saved = [dict(r) for r in registries]
    blocks = examples()

    def run(name: str, **names) -> dict:
        line, code = blocks[name]
        ns = {"__name__": "extending_" + name.replace("-", "_"), **names}
        exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), ns)
        return ns

    try:
        yield run
    finally:
        for r, s in zip(registries, saved):
            r.clear()
            r.update(s)


def test_the_doc_has_every_example_marked():
    found = examples()
    assert list(found) == NAMES
    assert DOC.read_text(encoding="utf-8").count("```python") == len(found), "every python block is a marked example"
    for name, (_, code) in found.items():
        lines = [x for x in code.splitlines() if x.strip()]
        assert len(lines) <= 40, f"example {name!r} has {len(lines)} lines of code: keep it short"


# ----------------------------------------------------------------------------------------- metric

def test_toy_metric_is_scored_selected_and_exported(run_example, tmp_path, mk):
    run_example("metric")
    m = get_metric("toy-confidence")
    assert m.kind == "eval" and m.score_columns == ("toy-confidence",) and "toy-confidence" in list_metrics()

    run_example("metric-use", work=str(tmp_path))
    # the score table: one float32 column, every sample scored, in range, declared in the metadata
    table = pd.read_parquet(tmp_path / "scores")
    v = table["toy-confidence"]
    assert len(table) == 32 and v.dtype == np.float32 and (table["status"] == "ok").all()
    assert np.isfinite(v).all() and v.min() >= 0 and v.max() <= 1 - 1 / 10 + 1e-6  # max softmax ≥ 1/classes
    meta = json.loads((tmp_path / "scores" / "_dataprune.json").read_text())
    decl = meta["metrics"]["toy-confidence"]
    assert decl["metric"] == "toy-confidence" and decl["range"] == [0.0, 1.0] and decl["direction"] == "higher = harder"
    assert decl["params"]["model"] == "test_resnet" and decl["params"]["epochs"] == 1
    # ... and its values are 1 - max softmax of the saved proxy model, recomputed here outside the engine
    recomputed = one_minus_max_softmax(tmp_path / "scores" / "_proxy-run0.safetensors", tmp_path / "data", mk)
    np.testing.assert_allclose(v.to_numpy(), [recomputed[k] for k in table["key"]], atol=1e-4)

    # select kept the hardest half by the toy column, and the manifest carries its values
    man = pq.read_table(tmp_path / "manifest.parquet").to_pandas()
    assert len(man) == 16 and man["key"].is_unique
    kept = table["key"].isin(man["key"])
    assert table.loc[kept, "toy-confidence"].min() >= table.loc[~kept, "toy-confidence"].max()
    by_key = table.set_index("key")["toy-confidence"]
    assert np.array_equal(man.set_index("key")["toy-confidence"].sort_index(), by_key[man["key"]].sort_index())

    # the exported shards, read back with webdataset: exactly the kept samples, bytes unchanged
    truth = {}
    for shard in sorted(glob.glob(str(tmp_path / "data" / "*.tar"))):
        members = mk.read_tar(shard)
        truth.update({n[:-4]: (int(members[n[:-4] + ".cls"]), b) for n, b in members.items() if n.endswith(".jpg")})
    assert wds_samples(str(tmp_path / "export")) == {k: truth[k] for k in man["key"]}


# ----------------------------------------------------------------------------------------- writer

def test_toy_writer_exports_and_reads_back(run_example, data, tmp_path, mk):
    run_example("writer")
    cls = writer_class("catalogue")
    assert list_writers()[-1] == "catalogue" and cls.name == "catalogue"

    ns = run_example("writer-use", data=data.wds_dir, work=str(tmp_path))
    src = open_source(data.wds_dir)
    expected = {s.key: {"shard": s.shard, "key": s.key, "label": s.label,
                        "sha256": {e: hashlib.sha256(b).hexdigest() for e, b in s.members.items()}}
                for sh in src.list_shards() for s in src.iter_samples(sh)}
    out = tmp_path / "catalogue"
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {x["key"]: x for x in lines} == expected and len(lines) == len(data.truth) == 24
    assert [x["key"] for x in lines] == sorted(expected)  # source order
    index = ns["index"]
    assert index["format"] == "catalogue" and index["samples"] == 24 and index["skipped"] == {}
    assert index["files"] == [{"name": "samples.jsonl", "samples": 24}]
    assert index["catalogue_fields"] == ["shard", "key", "label", "sha256"]
    assert json.loads((out / "index.json").read_text()) == {k: v for k, v in index.items() if k not in ("seconds", "processes")}
    assert sorted(set(os.listdir(out)) - {LOCK_NAME}) == ["index.json", "samples.jsonl"]

    # a shuffled export: the same lines in another order
    export(str(tmp_path / "all.parquet"), ExportConfig(to="catalogue", out=str(tmp_path / "shuffled"), shuffle=True, seed=3))
    shuffled = [json.loads(x) for x in (tmp_path / "shuffled" / "samples.jsonl").read_text().splitlines()]
    assert sorted(shuffled, key=lambda x: x["key"]) == sorted(lines, key=lambda x: x["key"]) and shuffled != lines

    # `dataprune export --to catalogue` finds it; exporting over an earlier wds export leaves only its own files
    mixed = tmp_path / "mixed"
    export(str(tmp_path / "all.parquet"), ExportConfig(to="wds", out=str(mixed)))
    r = mk.cli_fast("export", tmp_path / "all.parquet", "--to", "catalogue", "--out", mixed)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(set(os.listdir(mixed)) - {LOCK_NAME}) == ["index.json", "samples.jsonl"]
    assert (mixed / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()

    # abort removes what was written
    (tmp_path / "aborted").mkdir()
    w = cls(ExportConfig(to="catalogue", out=str(tmp_path / "aborted")), data.classes, ExportStats())
    s = next(iter(src.iter_samples(src.list_shards()[0])))
    w.add(s.shard, s.key, s.label, s.members, None)
    w.abort()
    assert os.listdir(tmp_path / "aborted") == []


# --------------------------------------------------------------------------------------- strategy

def test_toy_strategy_selects_and_meets_the_strategy_contract(run_example, data, tmp_path, mk):
    with mk.module(Path(__file__).with_name("test_strategies_contract.py")) as strategy_contract:  # its tests, run on the toy
        _toy_strategy(run_example, data, tmp_path, mk, strategy_contract)


def _toy_strategy(run_example, data, tmp_path, mk, strategy_contract):
    run_example("strategy")
    assert list_strategies()[-1] == "spread"

    ns = run_example("strategy-use", data=data.wds_dir, work=str(tmp_path))
    summary = ns["result"]["summary"]
    assert summary["rows"] == 24 and summary["kept"] == 6 and summary["by"] == ["jpeg_bytes"]
    assert ns["result"]["config"]["keep"] == "spread"
    sizes = pd.read_csv(tmp_path / "sizes.csv", dtype={"key": str})
    man = pq.read_table(tmp_path / "spread.parquet").to_pandas()
    kept = np.sort(sizes.loc[sizes["key"].isin(man["key"]), "jpeg_bytes"].to_numpy())
    ranked = np.sort(sizes["jpeg_bytes"].to_numpy())
    assert len(kept) == 6
    for i, v in enumerate(kept):  # one sample from each sixth of the score order (whatever the tie break)
        assert ranked[4 * i] <= v <= ranked[4 * i + 3]
    # the manifest exports like any other
    export(str(tmp_path / "spread.parquet"), ExportConfig(to="wds", out=str(tmp_path / "export")))
    assert wds_samples(str(tmp_path / "export")) == {k: data.truth[k] for k in man["key"]}

    # `select --keep spread` on the command line: the same manifest rows
    r = mk.cli_fast("select", tmp_path / "sizes.csv", "--data", data.wds_dir, "--keep", "spread", "--frac", "0.25",
                    "--out", tmp_path / "cli.parquet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(pq.read_table(tmp_path / "cli.parquet").column("key").to_pylist()) == sorted(man["key"])

    # the registry's contract tests (tests/test_strategies_contract.py), run on the toy strategy
    for frac, count in [(0.37, None), (0.05, None), (1.0, None), (None, 1), (None, 1234)]:
        strategy_contract.test_keeps_exactly_the_budget("spread", frac, count)
    for balanced in (False, True):
        strategy_contract.test_deterministic_under_a_seed("spread", balanced)
        for dtype in (np.float32, np.float64):
            strategy_contract.test_independent_of_row_order("spread", balanced, dtype)
    for mode in ("proportional", "equal"):
        for frac in (0.1, 0.45, 0.9):
            strategy_contract.test_class_balanced_keeps_each_class_quota("spread", mode, frac)
    # after --drop-hardest the strategy sees only what is left, and still keeps exactly the budget
    ids, sc, labels = strategy_contract.data(seed=5)
    balanced = plan_selection(config_for("spread", frac=0.5, drop_hardest=0.2, class_balanced=True), ids, sc, labels)
    assert int(balanced.keep.sum()) == balanced.budget == 1500 and balanced.dropped_hardest > 0
    sel = plan_selection(config_for("spread", frac=0.5, drop_hardest=0.2), ids, sc, labels)
    assert int(sel.keep.sum()) == 1500 and sel.dropped_hardest == 600
    assert sc[sel.keep].max() <= np.sort(sc)[-600]  # nothing from the hardest fifth, which was dropped first
    assert sc[sel.keep].min() == sc.min()  # ... and the easy end is still covered


# ----------------------------------------------------------------------------------------- source

def write_listing(root: Path, truth: dict, classes: list, missing: tuple[str, ...] = ()) -> str:
    """A ``file,class`` CSV beside the images it lists (plus rows for ``missing`` files)."""
    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["file", "class"])
        for key, (label, img) in sorted(truth.items()):
            (root / f"{key}.jpg").write_bytes(img)
            w.writerow([f"{key}.jpg", classes[label]])
        for name in missing:
            w.writerow([name, classes[0]])
    return str(root / "labels.csv")


def test_toy_source_is_read_by_info_manifest_export_and_score(run_example, data, tmp_path):
    run_example("source")
    assert "csv" in list_formats()
    listing = write_listing(tmp_path / "csvdata", data.truth, data.classes)
    names = sorted({data.classes[lbl] for lbl, _ in data.truth.values()})
    expected = {k: (names.index(data.classes[lbl]), img) for k, (lbl, img) in data.truth.items()}

    src = open_source(listing, "csv")
    (shard,) = src.list_shards()
    samples = list(src.iter_samples(shard))
    assert src.classes == names and all(s.ok for s in samples)
    assert {s.key: (s.label, s.image) for s in samples} == expected
    assert src.spec() == {"format": "csv", "path": listing, "options": {}}
    (back,) = src.fetch(samples[3].loc_path, [(samples[3].key, 0, 0)])
    assert back.key == samples[3].key and back.members == samples[3].members

    ns = run_example("source-use", listing=listing, work=str(tmp_path))
    info = ns["info"]
    assert info["format"] == "csv" and info["samples"] == info["ok"] == 24 and info["checked"] and info["problems"] == {}
    assert sum(c["count"] for c in info["classes"]) == 24 and {c["name"] for c in info["classes"]} == set(names)
    assert wds_samples(str(tmp_path / "as-wds")) == expected

    # score reads it through the same registry (the data stream reopens it from its spec())
    r = score(ScoreConfig(data=listing, format="csv", metrics=("entropy",), out=str(tmp_path / "scores"), model="test_resnet",
                          epochs=1, batch_size=12, workers=0))
    assert r["scored"] == 24 and r["skipped"] == 0
    t = pd.read_parquet(tmp_path / "scores")
    assert set(t["sample_id"].astype("uint64")) == {s.sample_id for s in samples} and t["entropy"].notna().all()

    # a listed file that is missing is a per-sample problem, counted; export skips it
    broken = write_listing(tmp_path / "broken", data.truth, data.classes, missing=("gone.jpg",))
    info = run_example("source-use", listing=broken, work=str(tmp_path / "b"))["info"]
    assert info["samples"] == 25 and info["ok"] == 24 and info["problems"] == {"unreadable": 1}


def test_launcher_runs_the_cli_with_the_extensions(data, tmp_path):
    """The registration blocks, saved as one module, plus the launcher block: the real CLI in a
    subprocess sees the toy source, writer and strategy."""
    blocks = examples()
    (tmp_path / "my_extensions.py").write_text("\n\n".join(blocks[n][1] for n in REGISTRATIONS), encoding="utf-8")
    (tmp_path / "dataprune_plus.py").write_text(blocks["launcher"][1], encoding="utf-8")
    listing = write_listing(tmp_path / "csvdata", data.truth, data.classes)
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")

    def cli(*args) -> str:
        r = subprocess.run([sys.executable, "dataprune_plus.py", *map(str, args)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    info = json.loads(cli("info", listing, "--format", "csv", "--json"))
    assert info["format"] == "csv" and info["samples"] == 24
    cli("manifest", listing, "--format", "csv", "--out", tmp_path / "m.parquet")
    cli("export", tmp_path / "m.parquet", "--to", "catalogue", "--out", tmp_path / "cat")
    lines = (tmp_path / "cat" / "samples.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["key"] for x in lines) == sorted(data.truth)
    # nothing was registered in this process
    assert "csv" not in list_formats() and "catalogue" not in list_writers()


def test_registries_are_as_before():
    """Last in this file: every registration above was undone, so the contract tests see only their own."""
    assert [list(r) for r in (METRICS, _WRITERS, STRATEGIES, SOURCES)] == BEFORE
    assert "toy-confidence" not in BEFORE[0] and "catalogue" not in BEFORE[1] and "spread" not in BEFORE[2] and "csv" not in BEFORE[3]
