"""Foreign score files (select/foreign.py): a direction per input, ImageNet file names matched by stem
against folder/tar keys, and the released ImageNet-1K score CSVs of Sorscher et al. (generated here in
their layout: the real files cannot be downloaded in tests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune import scoretable, tables
from dataprune.errors import ConfigError, TableError
from dataprune.ids import sample_id
from dataprune.select import SelectConfig, run_select
from dataprune.select.foreign import IMAGENET_TRAIN_ROWS, metric_name, split_direction, stems

SOURCE = {"format": "folder", "path": "/data/imagenet/train", "options": {}}
SYNSETS = ["n01440764", "n01443537", "n01484850"]


def imagenet_keys(n: int) -> list[str]:
    """Folder-source keys of ImageNet's training images: synset/synset_number (no extension)."""
    return [f"{SYNSETS[i % 3]}/{SYNSETS[i % 3]}_{10000 + i}" for i in range(n)]


def folder_table(path, n=60) -> tuple[str, list[str]]:
    keys = imagenet_keys(n)
    os.makedirs(path, exist_ok=True)
    d = pa.dictionary(pa.int32(), pa.string())
    arrays = [pa.array([sample_id("", k) for k in keys], pa.uint64()), pa.array(["train"] * n).dictionary_encode().cast(d),
              pa.array(keys), pa.array([i % 3 for i in range(n)], pa.int32()),
              pa.array([f"/data/imagenet/train/{k}.JPEG" for k in keys]).dictionary_encode().cast(d),
              pa.array(np.zeros(n, np.int64)), pa.array(np.full(n, 1000, np.int64)),
              pa.array(["ok"] * n).dictionary_encode().cast(d), pa.nulls(n, pa.string())]
    scoretable.write_part(str(path), 0, pa.Table.from_arrays(arrays, schema=pa.schema(list(tables.BASE_FIELDS))), {"rows": n})
    scoretable.write_table_meta(str(path), scoretable.score_table_meta(SOURCE, SYNSETS, ["train"], {}))
    return str(path), keys


def released_csv(path, keys, scores, header=",filename,score", name=lambda k: k.split("/")[-1] + ".JPEG") -> str:
    """A CSV in the released layout: header, then index, ImageNet file name, score."""
    lines = [header] + [f"{i},{name(k)},{s}" for i, (k, s) in enumerate(zip(keys, scores))]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def kept_keys(path) -> set[str]:
    return set(pq.read_table(str(path), columns=["key"]).column(0).to_pylist())


def test_released_file_selects_by_file_name(tmp_path):
    t, keys = folder_table(tmp_path / "t")
    scores = np.arange(len(keys))[::-1].astype(float)  # the first keys score highest
    csv = released_csv(tmp_path / "ImageNet-1K_EL2N-20-models.csv", keys, scores)
    out = tmp_path / "m.parquet"
    r = run_select([t, csv], SelectConfig(frac=0.25, expect_rows=len(keys)), str(out))
    assert r["summary"]["by"] == ["el2n_20_models"]
    assert r["summary"]["joins"][0] == {"input": csv, "on": "name", "rows": 60, "missing": 0, "extra": 0}
    assert kept_keys(out) == set(keys[:15])  # the highest scores = harder = kept by --keep hard
    # the same file given as higher-is-easier keeps the other end
    r2 = run_select([t, csv + ":easier"], SelectConfig(frac=0.25, expect_rows=60), str(tmp_path / "e.parquet"))
    assert kept_keys(tmp_path / "e.parquet") == set(keys[-15:])
    assert r2["inputs"][1]["direction"] == "higher-is-easier"
    r3 = run_select([t, csv], SelectConfig(frac=0.25, expect_rows=60, direction="higher-is-easier"), str(tmp_path / "d.parquet"))
    assert kept_keys(tmp_path / "d.parquet") == set(keys[-15:]) and r3["inputs"][1]["direction"] == "higher-is-easier"


@pytest.mark.parametrize("form", ["base", "synset-dir", "train-path", "no-extension"])
def test_names_match_keys_by_stem(tmp_path, form):
    t, keys = folder_table(tmp_path / "t", n=30)
    name = {"base": lambda k: k.split("/")[-1] + ".JPEG", "synset-dir": lambda k: k + ".JPEG",
            "train-path": lambda k: "train/" + k + ".jpeg", "no-extension": lambda k: k.split("/")[-1]}[form]
    csv = released_csv(tmp_path / "ImageNet-1K_forgetting.csv", keys, np.arange(30) % 5, name=name)
    r = run_select([t, csv], SelectConfig(frac=0.5, expect_rows=30), None, dry_run=True)
    assert r["summary"]["joins"][0]["missing"] == 0 and r["summary"]["candidates"] == 30
    assert stems(pa.array(["a/b/n0_1.JPEG", "n0_2", "x.y/n0_3.png"])).to_pylist() == ["n0_1", "n0_2", "n0_3"]


def test_unmatched_names_are_counted_and_strict_refuses(tmp_path):
    t, keys = folder_table(tmp_path / "t", n=40)
    other = [f"n09999999/n09999999_{i}" for i in range(5)]
    csv = released_csv(tmp_path / "ImageNet-1K_memorization.csv", keys[:30] + other, np.linspace(0, 1, 35))
    r = run_select([t, csv], SelectConfig(frac=0.5, expect_rows=35), str(tmp_path / "m.parquet"))
    j = r["summary"]["joins"][0]
    assert (j["missing"], j["extra"], j["rows"]) == (10, 5, 35)
    assert r["summary"]["excluded"] == {f"missing:{csv}": 10} and r["summary"]["candidates"] == 30
    with pytest.raises(TableError, match="10 selectable rows .* missing from .* and 5 of its rows are not in"):
        run_select([t, csv], SelectConfig(frac=0.5, expect_rows=35, join="strict"), None, dry_run=True)


def test_released_reader_says_what_it_expected(tmp_path):
    t, keys = folder_table(tmp_path / "t", n=20)
    s = np.ones(20)
    cases = [
        (str(tmp_path / "ImageNet-1K_a.csv"), "found 4 columns",
         lambda p: p.write_text(",filename,score,extra\n" + "".join(f"{i},{k.split('/')[-1]}.JPEG,1,2\n" for i, k in enumerate(keys)))),
        (str(tmp_path / "ImageNet-1K_b.csv"), "not an integer index",
         lambda p: p.write_text("x,filename,score\n" + "".join(f"a{i},{k.split('/')[-1]}.JPEG,1\n" for i, k in enumerate(keys)))),
        (str(tmp_path / "ImageNet-1K_c.csv"), "line 4: 'cat.jpg' is not an ImageNet training file name",
         lambda p: p.write_text(",filename,score\n" + "".join(f"{i},{'cat.jpg' if i == 2 else k.split('/')[-1]},1\n"
                                                                  for i, k in enumerate(keys)))),
        (str(tmp_path / "ImageNet-1K_d.csv"), "is string, not numbers",
         lambda p: p.write_text(",filename,score\n" + "".join(f"{i},{k.split('/')[-1]},high\n" for i, k in enumerate(keys)))),
        (str(tmp_path / "ImageNet-1K_f.csv"), "no header row",  # its first image would be read as the header
         lambda p: p.write_text("".join(f"{i},{k.split('/')[-1]}.JPEG,{i}.5\n" for i, k in enumerate(keys)))),
    ]
    for path, msg, write in cases:
        write(Path(path))
        with pytest.raises(ConfigError, match=msg) as e:
            run_select([t, path], SelectConfig(frac=0.5, expect_rows=20), None, dry_run=True)
        assert path in str(e.value) and "expected" in str(e.value)
    # the row count: ImageNet-1K's by default, --expect-rows otherwise, 0 for any
    csv = released_csv(tmp_path / "ImageNet-1K_forgetting.csv", keys, s)
    with pytest.raises(ConfigError, match=r"20 score rows, expected 1,281,167 \(ImageNet-1K's training set\)"):
        run_select([t, csv], SelectConfig(frac=0.5), None, dry_run=True)
    with pytest.raises(ConfigError, match=r"20 score rows, expected 21 \(--expect-rows\)"):
        run_select([t, csv], SelectConfig(frac=0.5, expect_rows=21), None, dry_run=True)
    assert run_select([t, csv], SelectConfig(frac=0.5, expect_rows=0), None, dry_run=True)["summary"]["candidates"] == 20
    # a duplicated file name
    dup = released_csv(tmp_path / "ImageNet-1K_e.csv", keys + keys[:1], np.ones(21))
    with pytest.raises(TableError, match="1 duplicate name values"):
        run_select([t, dup], SelectConfig(frac=0.5, expect_rows=21), None, dry_run=True)
    with pytest.raises(ConfigError, match="unknown direction suffix 'sideways'"):
        run_select([t, csv + ":sideways"], SelectConfig(frac=0.5, expect_rows=0), None, dry_run=True)


def test_full_size_file_passes_the_default_check(tmp_path):
    """A file of ImageNet-1K's 1,281,167 rows needs no flag; the table's 50 rows are matched among them."""
    t, keys = folder_table(tmp_path / "t", n=50)
    names = [k.split("/")[-1] + ".JPEG" for k in keys]
    names += [f"n02000000_{i}.JPEG" for i in range(IMAGENET_TRAIN_ROWS - 50)]
    score = (np.arange(IMAGENET_TRAIN_ROWS) % 1000) / 1000
    path = tmp_path / "ImageNet-1K_supervised-prototypes.csv"
    with open(path, "w") as f:
        f.write(",filename,score\n")
        f.write("".join(f"{i},{n},{s}\n" for i, (n, s) in enumerate(zip(names, score.tolist()))))
    r = run_select([t, str(path)], SelectConfig(frac=0.5), None, dry_run=True)
    assert r["summary"]["by"] == ["supervised_prototypes"]
    assert r["summary"]["joins"][0]["extra"] == IMAGENET_TRAIN_ROWS - 50 and r["summary"]["candidates"] == 50


def test_a_file_name_column_in_any_csv_and_the_names(tmp_path):
    t, keys = folder_table(tmp_path / "t", n=20)
    p = tmp_path / "mine.csv"
    p.write_text("filename,difficulty\n" + "".join(f"{k}.JPEG,{i}\n" for i, k in enumerate(keys)))
    r = run_select([t, str(p) + ":easier"], SelectConfig(frac=0.25), str(tmp_path / "m.parquet"))
    assert kept_keys(tmp_path / "m.parquet") == set(keys[:5])  # higher is easier: the lowest values are the hardest
    assert r["summary"]["joins"][0]["on"] == "name"
    assert metric_name("x/ImageNet-1K_EL2N-1-model.csv") == "el2n_1_model" and metric_name("scores.csv") is None
    assert split_direction("a.csv:harder", "higher-is-easier") == ("a.csv", "higher-is-harder")
    assert split_direction("a.csv", "higher-is-easier") == ("a.csv", "higher-is-easier")


def test_a_direction_suffix_on_a_score_table_is_refused_not_ignored(tmp_path):
    """A table records its own direction: ``TABLE:easier`` must not silently select the hard end."""
    t, _ = folder_table(tmp_path / "t", n=20)
    with pytest.raises(ConfigError, match="--keep easy"):
        run_select([t + ":easier"], SelectConfig(keep="random", frac=0.5), str(tmp_path / "m.parquet"))
    assert not (tmp_path / "m.parquet").exists()


def test_direction_without_a_foreign_file_is_refused_not_ignored(tmp_path):
    """``--direction higher-is-easier`` reverses foreign files only: with our tables alone it would
    change nothing, so it is an error, not a silent hard-end selection."""
    t, _ = folder_table(tmp_path / "t", n=20)
    with pytest.raises(ConfigError, match="foreign score files"):
        run_select([t], SelectConfig(keep="random", frac=0.5, direction="higher-is-easier"), str(tmp_path / "m.parquet"))
    assert not (tmp_path / "m.parquet").exists()
    run_select([t], SelectConfig(keep="random", frac=0.5, direction="higher-is-harder"), str(tmp_path / "m.parquet"))
    assert pq.ParquetFile(tmp_path / "m.parquet").metadata.num_rows == 10


def test_cli_with_a_released_file(tmp_path):
    t, keys = folder_table(tmp_path / "t", n=40)
    csv = released_csv(tmp_path / "ImageNet-1K_forgetting.csv", keys, np.arange(40) % 4)
    out = tmp_path / "m.parquet"
    p = subprocess.run([sys.executable, "-m", "dataprune", "select", t, csv + ":easier", "--expect-rows", "40", "--frac",
                        "0.5", "--class-balanced", "--out", str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert pq.ParquetFile(out).metadata.num_rows == 20
    p = subprocess.run([sys.executable, "-m", "dataprune", "select", t, csv, "--frac", "0.5", "--out", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "expected 1,281,167" in p.stderr and "Traceback" not in p.stderr
