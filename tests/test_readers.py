"""Outputs other tools read (issue 13): a real score table read by polars, DuckDB, pandas and
pyarrow.dataset; the training artifacts a finished run removes or keeps; tables of 0.1's flat layout;
sample ids as DuckDB, polars, pandas and CSV files carry them (``tables.as_sample_ids``)."""

from __future__ import annotations

import decimal
import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.demo import make_demo
from dataprune.engine import ScoreConfig, score
from dataprune.errors import ConfigError, TableError
from dataprune.tables import BASE_COLUMNS, as_sample_ids

TINY = "test_resnet"
TRAIN = ["--metric", "el2n", "--model", TINY, "--epochs", "1", "--batch-size", "8", "--workers", "0"]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
U64 = 1 << 64


def cli(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataprune.cli", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def error_line(p: subprocess.CompletedProcess, code: int) -> str:
    assert p.returncode == code, f"exit {p.returncode}, wanted {code}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def listing(root) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(root) for f in fs if f != ".dataprune.lock"}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A real `dataprune score` of the demo data (4 shards of 10) with a trained proxy."""
    d = tmp_path_factory.mktemp("readers")
    make_demo(str(d / "data"), n=40, shard_size=10, image_size=16)
    r = cli("score", d / "data", *TRAIN, "--out", d / "s", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    parts = sorted((d / "s" / "parts").iterdir())
    expected = pa.concat_tables([pq.read_table(p) for p in parts])
    return d, summary, expected


# ------------------------------------------------------------------------------ the layout, read

def test_a_select_manifest_reads_the_same_in_polars_duckdb_pandas_and_hf_datasets(scored, tmp_path):
    """The manifest's own encoding (delta-packed offsets and sizes, dictionaries, plain ids and
    scores: ``manifest.writer_options``) is read back value for value by every reader users have."""
    import datasets
    import duckdb
    import pandas as pd
    import polars as pl

    d, _, expected = scored
    m = tmp_path / "m.parquet"
    p = cli("select", d / "s", "--keep", "hard", "--frac", "0.75", "--out", m)
    assert p.returncode == 0, p.stderr
    chunk = pq.ParquetFile(m).metadata.row_group(0)
    enc = {chunk.column(i).path_in_schema: chunk.column(i).encodings for i in range(chunk.num_columns)}
    assert "DELTA_BINARY_PACKED" in enc["loc_size"] and "DELTA_BINARY_PACKED" in enc["loc_offset"], enc
    ref = pq.read_table(m)
    assert ref.num_rows == 30
    by_id = {r["sample_id"]: r for r in expected.to_pylist()}
    for r in ref.to_pylist():  # the manifest copies its rows' locations from the table
        assert {c: r[c] for c in ("key", "label", "loc_offset", "loc_size", "el2n")} == \
               {c: by_id[r["sample_id"]][c] for c in ("key", "label", "loc_offset", "loc_size", "el2n")}
    rel = duckdb.sql(f"SELECT * FROM '{m}'")
    tables = {"polars": pl.read_parquet(str(m)).to_arrow(), "duckdb": (getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table)(),
              "pandas": pa.Table.from_pandas(pd.read_parquet(m), preserve_index=False)}
    tables["datasets"] = datasets.Dataset.from_parquet(str(m), cache_dir=str(tmp_path / "hf")).data.table
    for who, got in tables.items():
        assert got.column_names == ref.column_names, who
        for c in ref.column_names:
            want = ref.column(c)
            want = want.cast(pa.string()) if pa.types.is_dictionary(want.type) else want
            g = got.column(c)
            g = g.cast(pa.string()) if pa.types.is_dictionary(g.type) or pa.types.is_large_string(g.type) else g
            assert g.cast(want.type).to_pylist() == want.to_pylist(), (who, c)


def test_parts_are_alone_in_their_directory_and_everything_else_is_hidden(scored):
    d, summary, _ = scored
    out = d / "s"
    assert sorted(p.name for p in (out / "parts").iterdir()) == [f"part-{i:06d}.parquet" for i in range(4)]
    assert all(n == "parts" or n[0] in "_." for n in os.listdir(out)), os.listdir(out)
    assert (out / "_proxy-run0.safetensors").is_file() and not (out / ".train").exists()
    assert summary["seen"] == 40 and summary["artifacts_removed"] == [str(out / ".train" / "run-0.pt")]
    assert summary["artifacts"] == [{"path": str(out / "_proxy-run0.safetensors"), "kind": "proxy",
                                     "bytes": (out / "_proxy-run0.safetensors").stat().st_size}]


def _same(got: pa.Table, expected: pa.Table, who: str) -> None:
    assert got.column_names == expected.column_names == BASE_COLUMNS + ["el2n", "pred_label", "pred_prob"], who
    assert got.num_rows == expected.num_rows == 40, who
    g = got.sort_by("sample_id")
    e = expected.sort_by("sample_id")
    for c in ("sample_id", "key", "label", "loc_offset", "loc_size", "el2n", "pred_label", "pred_prob"):
        assert g.column(c).cast(e.column(c).type).to_pylist() == e.column(c).to_pylist(), (who, c)
    for c in ("shard", "status"):
        assert g.column(c).cast(pa.string()).to_pylist() == e.column(c).cast(pa.string()).to_pylist(), (who, c)


def test_polars_duckdb_pandas_and_pyarrow_read_exactly_the_table(scored):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    d, _, expected = scored
    out = d / "s"
    _same(pl.scan_parquet(str(out / "parts")).collect().to_arrow(), expected, "polars OUT/parts")
    _same(pl.read_parquet(str(out / "parts" / "*.parquet")).to_arrow(), expected, "polars glob")
    rel = duckdb.sql(f"SELECT * FROM '{out}/parts/*.parquet'")
    _same((getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table)(), expected, "duckdb")
    for where in (out, out / "parts"):
        _same(pa.Table.from_pandas(pd.read_parquet(where), preserve_index=False), expected, f"pandas {where}")
        _same(ds.dataset(str(where), format="parquet").to_table(), expected, f"pyarrow.dataset {where}")
        assert len(ds.dataset(str(where), format="parquet").files) == 4


def test_dataprune_readers_take_the_parts_directory_too(scored, tmp_path):
    from dataprune.scoretable import read_score_table
    from dataprune.select.inputs import open_input

    d, _, expected = scored
    out = d / "s"
    _same(read_score_table(str(out / "parts")), expected, "read_score_table")
    a, b = open_input(str(out)), open_input(str(out / "parts"))
    assert a.path == b.path and a.files == b.files and a.fingerprint() == b.fingerprint()
    with pytest.raises(ConfigError, match="one part of the score table"):
        open_input(str(out / "parts" / "part-000000.parquet"))
    for i, where in enumerate((out, out / "parts")):
        p = cli("select", where, "--frac", "0.5", "--json", "--out", tmp_path / f"m{i}.parquet")
        assert p.returncode == 0, p.stderr
    assert pq.read_table(tmp_path / "m0.parquet").equals(pq.read_table(tmp_path / "m1.parquet"))


# -------------------------------------------------------------------------------- artifacts

def test_checkpoints_are_removed_unless_kept(tmp_path):
    make_demo(str(tmp_path / "data"), n=20, shard_size=10, image_size=16)
    base = dict(data=str(tmp_path / "data"), metrics=("el2n",), model=TINY, epochs=1, batch_size=8, workers=0, device="cpu")
    kept = score(ScoreConfig(**base, out=str(tmp_path / "k"), keep_artifacts=True))
    ck = tmp_path / "k" / ".train" / "run-0.pt"
    assert ck.is_file() and kept["artifacts_removed"] == []
    assert {a["kind"]: a["bytes"] for a in kept["artifacts"]} == {
        "checkpoint": ck.stat().st_size, "proxy": (tmp_path / "k" / "_proxy-run0.safetensors").stat().st_size}
    # keep_artifacts is not a parameter of the scores: the same table, complete, nothing trained again
    again = score(ScoreConfig(**base, out=str(tmp_path / "k")))
    assert again["shards_done_before"] == 2 and again["seen"] == 0 and again["train"] is None
    assert again["artifacts_removed"] == [str(ck)] and not (tmp_path / "k" / ".train").exists()
    (tmp_path / "k" / ".train").mkdir()
    (tmp_path / "k" / ".train" / "notes.txt").write_text("mine")  # not ours: stays, and so does .train
    score(ScoreConfig(**base, out=str(tmp_path / "k")))
    assert (tmp_path / "k" / ".train" / "notes.txt").read_text() == "mine"


def test_a_rescored_part_after_the_checkpoints_are_gone_gives_the_same_table(scored, tmp_path):
    d, _, expected = scored
    t = tmp_path / "t"
    shutil.copytree(d / "s", t)
    (t / "parts" / "part-000002.parquet").unlink()
    r = cli("score", d / "data", *TRAIN, "--out", t, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shards_done_before"] == 3
    from dataprune.scoretable import read_score_table

    _same(read_score_table(str(t)), expected, "rescored")


# ------------------------------------------------------------------------ tables of 0.1 (flat)

def test_a_flat_table_still_selects_and_is_never_written_into(scored, tmp_path):
    d, _, _ = scored
    old = tmp_path / "old"
    shutil.copytree(d / "s", old)
    for p in (old / "parts").iterdir():
        p.rename(old / p.name)
    (old / "parts").rmdir()
    p = cli("select", old, "--frac", "0.5", "--json", "--out", tmp_path / "m_old.parquet")
    assert p.returncode == 0, p.stderr
    assert cli("select", d / "s", "--frac", "0.5", "--out", tmp_path / "m_new.parquet").returncode == 0
    assert pq.read_table(tmp_path / "m_old.parquet").column("sample_id").equals(pq.read_table(tmp_path / "m_new.parquet").column("sample_id"))
    before = listing(old)
    line = error_line(cli("score", d / "data", *TRAIN, "--out", old), 2)
    assert "0.1" in line and f"mkdir {old / 'parts'}" in line and "mv" in line and "--overwrite" in line, line
    assert listing(old) == before
    os.mkdir(old / "parts")  # what the line says to do: the markers still verify the moved parts
    for i in range(4):
        (old / f"part-{i:06d}.parquet").rename(old / "parts" / f"part-{i:06d}.parquet")
    r = cli("score", d / "data", *TRAIN, "--out", old, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["shards_done_before"] == 4, r.stderr


def test_a_parts_link_is_refused(scored, tmp_path):
    d, _, _ = scored
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "t").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "t" / "parts")
    error_line(cli("score", d / "data", *TRAIN, "--out", tmp_path / "t"), 2)
    assert os.listdir(tmp_path / "elsewhere") == []


# ------------------------------------------------------------------------------- sample ids

BIG = [U64 - 1, 1 << 63, 12345, 0]


@pytest.mark.parametrize("arr", [
    pa.array(BIG, pa.uint64()),
    pa.array([decimal.Decimal(v) for v in BIG], pa.decimal128(38, 0)),
    pa.array([str(v) for v in BIG]),
    pa.array([f" {v}\t" for v in BIG], pa.large_string()),
    pa.array([str(v) for v in BIG]).dictionary_encode(),
    pa.array([v.to_bytes(16, "little") for v in BIG], pa.binary(16)),
], ids=["uint64", "decimal", "strings", "padded large strings", "dictionary", "int128 bytes"])
def test_ids_of_every_spelling_convert_exactly(arr):
    got = as_sample_ids(arr, "f.parquet")
    assert got.type == pa.uint64() and got.to_pylist() == BIG


def test_small_ids_convert_from_int64_and_exact_floats():
    assert as_sample_ids(pa.array([5, 7], pa.int64()), "f").to_pylist() == [5, 7]
    assert as_sample_ids(pa.array([5.0, 2.0 ** 53 - 1]), "f").to_pylist() == [5, 2 ** 53 - 1]
    assert as_sample_ids(pa.array([], pa.float64()), "f").to_pylist() == []


@pytest.mark.parametrize("arr, row, words", [
    (pa.array([3, -1], pa.int64()), 1, ["-1", "negative"]),
    (pa.array([3, None], pa.uint64()), 1, ["None", "null"]),
    (pa.array([decimal.Decimal(1), decimal.Decimal(U64)], pa.decimal128(38, 0)), 1, [str(U64), "2**64"]),
    (pa.array([decimal.Decimal("1.5")], pa.decimal128(10, 1)), 0, ["1.5", "whole"]),
    (pa.array(["7", str(U64)]), 1, [str(U64), "2**64"]),
    (pa.array(["7", "id-3"]), 1, ["id-3", "whole"]),
    (pa.array(["-4"]), 0, ["negative"]),
    (pa.array([1.0, 2.0 ** 60]), 1, ["2**53", "UBIGINT"]),
    (pa.array([1.5]), 0, ["whole"]),
    (pa.array([(1).to_bytes(8, "big").rjust(16, b"\0")], pa.binary(16)), 0, ["2**64"]),  # big-endian: refused, not misread
    (pa.array([(-2).to_bytes(16, "little", signed=True)], pa.binary(16)), 0, ["-2", "negative"]),
])
def test_bad_ids_name_the_file_column_row_and_value(arr, row, words):
    with pytest.raises(TableError) as e:
        as_sample_ids(arr, "x/f.parquet")
    msg = str(e.value)
    assert msg.startswith("x/f.parquet: column 'sample_id'") and f"row {row}" in msg and "uint64" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    with pytest.raises(TableError, match="not integers"):
        as_sample_ids(pa.array([True]), "f")


@pytest.fixture(scope="module")
def foreign(scored):
    """The table's ids and a score, written by DuckDB the ways other tools carry them."""
    import duckdb

    d, _, expected = scored
    ids = expected.select(["sample_id", "el2n"])
    assert max(ids.column("sample_id").to_pylist()) >= 1 << 63  # hashes: about half of them need the 64th bit
    con = duckdb.connect()
    con.register("t", ids)
    f = d / "foreign"
    f.mkdir()
    con.sql(f"COPY (SELECT sample_id::HUGEINT AS sample_id, el2n * 2 AS other FROM t) TO '{f}/hugeint.csv' (HEADER)")
    con.sql(f"COPY (SELECT sample_id::HUGEINT AS sample_id, el2n * 2 AS other FROM t) TO '{f}/hugeint.parquet' (FORMAT parquet)")
    con.sql(f"COPY (SELECT sample_id::DECIMAL(38,0) AS sample_id, el2n * 2 AS other FROM t) TO '{f}/decimal.parquet' (FORMAT parquet)")
    con.sql(f"COPY (SELECT sample_id, el2n * 2 AS other FROM t) TO '{f}/ubigint.parquet' (FORMAT parquet)")
    con.sql(f"COPY (SELECT (sample_id::HUGEINT - CASE WHEN sample_id >= 9223372036854775808 THEN 18446744073709551616 ELSE 0 END)"
            f"::BIGINT AS sample_id, el2n * 2 AS other FROM t) TO '{f}/bigint.parquet' (FORMAT parquet)")
    con.sql(f"COPY (SELECT sample_id::HUGEINT AS sample_id FROM t LIMIT 15) TO '{f}/keys.csv' (HEADER)")
    return d, f


@pytest.mark.parametrize("name", ["hugeint.csv", "decimal.parquet", "ubigint.parquet"])
def test_select_joins_duckdb_ids(foreign, tmp_path, name):
    d, f = foreign
    assert pq.read_schema(f / "decimal.parquet").field("sample_id").type == pa.decimal128(38, 0)
    p = cli("select", d / "s", f / name, "--by", "other", "--frac", "1.0", "--join", "strict", "--json", "--out", tmp_path / "m.parquet")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["summary"]["kept"] == 40


@pytest.mark.parametrize("name, words", [
    ("hugeint.parquet", ["hugeint.parquet", "'sample_id' (double)", "UBIGINT"]),  # DuckDB wrote doubles: already rounded
    ("bigint.parquet", ["bigint.parquet", "'sample_id' (int64)", "negative"]),
])
def test_select_refuses_ids_it_would_have_to_guess(foreign, tmp_path, name, words):
    d, f = foreign
    line = error_line(cli("select", d / "s", f / name, "--by", "other", "--frac", "1.0", "--out", tmp_path / "m.parquet"), 5)
    for w in words:
        assert w in line, (w, line)
    assert not (tmp_path / "m.parquet").exists()


def test_manifest_keys_from_duckdb(foreign, tmp_path):
    d, f = foreign
    p = cli("manifest", d / "data", "--keys", f / "keys.csv", "--out", tmp_path / "m.parquet")
    assert p.returncode == 0, p.stderr
    want = set((f / "keys.csv").read_text().split()[1:])  # the ids as DuckDB wrote them, in decimal
    assert {str(v) for v in pq.read_table(tmp_path / "m.parquet").column("sample_id").to_pylist()} == want and len(want) == 15
    (tmp_path / "bad.csv").write_text("sample_id\n12\n-3\n")
    line = error_line(cli("manifest", d / "data", "--keys", tmp_path / "bad.csv", "--out", tmp_path / "m2.parquet"), 5)
    assert "--keys" in line and "bad.csv" in line and "row 1" in line and "'-3'" in line, line


def test_polars_int128_is_one_line_saying_what_to_write(scored, tmp_path):
    import polars as pl

    d, _, expected = scored
    ids = expected.column("sample_id").to_pylist()
    pl.DataFrame({"sample_id": pl.Series(ids, dtype=pl.Int128), "other": [1.0] * len(ids)}).write_parquet(tmp_path / "p.parquet")
    line = error_line(cli("select", d / "s", tmp_path / "p.parquet", "--by", "other", "--frac", "1.0", "--out", tmp_path / "m.parquet"), 2)
    assert "p.parquet" in line and "UInt64" in line, line
    pl.DataFrame({"sample_id": pl.Series(ids, dtype=pl.UInt64), "other": [1.0] * len(ids)}).write_parquet(tmp_path / "u.parquet")
    p = cli("select", d / "s", tmp_path / "u.parquet", "--by", "other", "--frac", "1.0", "--json", "--out", tmp_path / "m.parquet")
    assert p.returncode == 0 and json.loads(p.stdout)["summary"]["kept"] == 40, p.stderr
