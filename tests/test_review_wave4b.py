"""Review of the manifest's one encoding (`manifest.writer_options`, one `Table.filter` per piece)
and of the per-view memo of the out-of-core `select` (`counting.View.memo`, `stream._codes` /
`_score_key`, `_cut`'s early return): the awkward tables the streamed path must still write
byte for byte as in memory, the memo's lifetime, and manifests (empty ones included, int64
extremes in the delta-packed columns) read back by every reader users have, and exported."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune import scoretable, tables
from dataprune.ids import mix64
from dataprune.manifest import MANIFEST_READ, write_manifest
from dataprune.select import SelectConfig
from dataprune.select.gather import arrange_inputs
from dataprune.select.stream import Stream

D = pa.dictionary(pa.int32(), pa.string())
I64 = np.iinfo(np.int64)


def _write_part(path: str, p: int, t: pa.Table, row_group: int | None) -> None:
    """``scoretable.write_part``, with row groups of ``row_group`` rows (parts written by other tools)."""
    if row_group is None:
        return scoretable.write_part(path, p, t, {"rows": t.num_rows})
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, compression="zstd", row_group_size=row_group)
    data = sink.getvalue()
    os.makedirs(os.path.join(path, scoretable.PARTS_DIR), exist_ok=True)
    tables.atomic_write_bytes(scoretable.part_path(path, p), data, tmp_dir=path)
    os.makedirs(os.path.join(path, tables.DONE_DIR), exist_ok=True)
    tables.atomic_write_json(os.path.join(path, scoretable.done_name(p)),
                             {"rows": t.num_rows, "part": {"rows": t.num_rows, "bytes": data.size,
                                                           "sha256": hashlib.sha256(data).hexdigest()}})


def build(path, score, labels, label_mask, sizes, row_group=None, offsets=None, lsizes=None) -> str:
    """A score table of parts of ``sizes`` rows (0 and 1 allowed), each of row groups of ``row_group`` rows."""
    n = len(score)
    lab = pa.array(labels.astype(np.int32), mask=label_mask) if labels is not None else pa.nulls(n, pa.int32())
    ids = mix64(np.arange(n, dtype=np.uint64), 11)
    status = np.where(np.arange(n) % 61 == 5, "decode_error", "ok")
    dup = np.arange(n) % 9 == 4
    offsets = np.arange(n, dtype=np.int64) * 512 if offsets is None else offsets
    lsizes = (np.arange(n) % 17 + 1).astype(np.int64) * 100 if lsizes is None else lsizes
    schema = pa.schema(list(tables.BASE_FIELDS) + [pa.field("el2n", pa.float32()), pa.field("is_duplicate", pa.bool_())])
    bounds = np.cumsum([0] + list(sizes))
    assert bounds[-1] == n
    for p in range(len(sizes)):
        idx = np.arange(bounds[p], bounds[p + 1])
        shard = f"shard-{p}"
        t = pa.Table.from_arrays([
            pa.array(ids[idx], pa.uint64()), pa.array([shard] * len(idx), pa.string()).dictionary_encode().cast(D),
            pa.array([f"{i:06d}" for i in idx], pa.string()), lab.take(pa.array(idx, pa.int64())),
            pa.array(["/data/" + shard] * len(idx), pa.string()).dictionary_encode().cast(D),
            offsets.take(pa.array(idx, pa.int64())) if isinstance(offsets, pa.Array) else pa.array(offsets[idx]),
            lsizes.take(pa.array(idx, pa.int64())) if isinstance(lsizes, pa.Array) else pa.array(lsizes[idx]),
            pa.array(status[idx].tolist(), pa.string()).dictionary_encode().cast(D), pa.nulls(len(idx), pa.string()),
            pa.array(score[idx], pa.float32()), pa.array(dup[idx])], schema=schema)
        _write_part(str(path), p, t, row_group)
    meta = scoretable.score_table_meta({"format": "wds", "path": "/nowhere", "options": {}}, [f"c{i}" for i in range(10)], [f"shard-{p}" for p in range(len(sizes))],
                                       {"el2n": {"params": {}}})
    scoretable.write_table_meta(str(path), meta)
    return str(path)


def awkward(path) -> str:
    """One-row parts between big ones, parts of many row groups, labels at and beyond 2^24 (and the
    int32 extremes), null labels, ties at every cut, signed zeros, infinities and NaN scores."""
    n = 700
    rng = np.random.default_rng(4)
    score = np.round(rng.random(n) * 4) / 4
    score[3::41], score[4::41], score[6::53], score[7::59], score[::50] = -0.0, 0.0, np.inf, -np.inf, np.nan
    labels = rng.choice([0, 5, 1 << 24, (1 << 24) + 1, (1 << 31) - 1, -(1 << 31)], n)
    return build(path, score, labels, np.arange(n) % 23 == 0, [1, 1, 300, 1, 0, 397], row_group=37)


CASES = [
    dict(class_balanced=True, drop_hardest=0.1),
    dict(keep="easy", class_balanced=True, class_quota="equal", frac=0.3),
    dict(keep="random", class_balanced=True, drop_hardest=0.05, seed=3),
    dict(strategy="ccs", class_balanced=True, ccs_beta=0.1, ccs_strata=4, min_score=-1e30, max_score=1e30),
    dict(dedup=True, min_score=0.0, max_score=0.75, count=9),
]


@pytest.mark.parametrize("limit", [1, 6000], ids=["decide-again-at-write", "kept-bits"])
@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
def test_awkward_parts_and_labels_stream_to_the_in_memory_manifest(tmp_path, case, limit, same):
    """The memoized codes and keys serve every pass (the counting pass's parts of one row, the
    parts of many row groups, the fused tally's hand-built views); 1 byte: the write pass decides
    again per part; 6 kB: the tally's bits pick the rows."""
    t = awkward(tmp_path / "t")
    same(t, tmp_path, limit, **case)


def test_each_pass_gets_views_with_a_fresh_memo(tmp_path):
    """A view's memo holds what depends on the decision's state (``codes_of``): no view, and no
    memo, may outlive its pass, so a pass after the state changed never reads stale codes."""
    t = awkward(tmp_path / "t")
    st = Stream(SelectConfig(frac=0.5, nan="drop", class_balanced=True), arrange_inputs([t])[0], ["el2n"], 6000)
    st.count()
    st.decide()
    seen: list[dict] = []  # the memos themselves (an id could be reused once one is freed)
    for _ in range(2):
        for v in st.views(ids=True):
            assert v.memo == {}
            c = st._codes(v)
            assert st._codes(v) is c and st._score_key(v) is st._score_key(v)  # memoized within the view
            np.testing.assert_array_equal(c, np.where(v.cand, st.codes_of(v.lab), 0))
            assert not any(v.memo is m for m in seen)
            seen.append(v.memo)


def _readers(m, tmp_path) -> dict[str, pa.Table]:
    import duckdb
    import pandas as pd
    import polars as pl

    rel = duckdb.sql(f"SELECT * FROM '{m}'")
    return {"polars": pl.read_parquet(str(m)).to_arrow(),
            "duckdb": (getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table)(),
            "pandas": pa.Table.from_pandas(pd.read_parquet(m, dtype_backend="pyarrow"), preserve_index=False)}


def _as_ref(ref: pa.Table, got: pa.Table, who: str) -> None:
    assert got.column_names == ref.column_names, who
    assert got.num_rows == ref.num_rows, who
    for c in ref.column_names:
        want, g = ref.column(c), got.column(c)
        want = want.cast(pa.string()) if pa.types.is_dictionary(want.type) else want
        if pa.types.is_dictionary(g.type) or pa.types.is_large_string(g.type) or pa.types.is_string_view(g.type):
            g = g.cast(pa.string())
        assert g.cast(want.type).to_pylist() == want.to_pylist(), (who, c)


def test_int64_extremes_and_nulls_in_the_delta_packed_columns_read_the_same_everywhere(tmp_path, same):
    """Offsets and sizes are DELTA_BINARY_PACKED now (their deltas wrap around 2^64 between the
    int64 extremes): every reader gets the values the table holds, nulls included, on both paths."""
    import datasets

    n = 900
    rng = np.random.default_rng(8)
    off = pa.array(rng.choice([I64.min, I64.max, 0, -1, 1 << 62, 12345], n).astype(np.int64), mask=np.arange(n) % 11 == 0)
    size = pa.array(rng.choice([I64.min, I64.max, 0, 1, 1 << 40], n).astype(np.int64), mask=np.arange(n) % 13 == 0)
    t = build(tmp_path / "t", rng.random(n), rng.integers(0, 4, n), None, [450, 450], offsets=off, lsizes=size)
    same(t, tmp_path, 1, frac=0.7, class_balanced=True)
    m = tmp_path / "stream.parquet"
    ref = pq.read_table(m)
    src = pa.concat_tables([pq.read_table(scoretable.part_path(t, p)) for p in range(2)])
    by_id = dict(zip(src.column("sample_id").to_pylist(), zip(src.column("loc_offset").to_pylist(), src.column("loc_size").to_pylist())))
    assert [by_id[i] for i in ref.column("sample_id").to_pylist()] == list(zip(ref.column("loc_offset").to_pylist(),
                                                                                ref.column("loc_size").to_pylist()))
    got = _readers(m, tmp_path)
    got["datasets"] = datasets.Dataset.from_parquet(str(m), cache_dir=str(tmp_path / "hf")).data.table
    for who, g in got.items():
        _as_ref(ref, g, who)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataprune", *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200"))


def test_an_empty_manifest_in_the_manifest_encoding_is_read_by_every_reader_and_exports(tmp_path):
    """A manifest of 0 rows (no row group at all) written by ``write_manifest`` for a real score
    table of a real dataset: pyarrow, polars, DuckDB and pandas read its schema and no rows, and
    `dataprune export` writes 0 samples with exit 0 in every format. (HF datasets refuses every
    empty parquet file, ours or pyarrow's: 'Instruction "train" corresponds to no data!'.)"""
    from dataprune.demo import make_demo

    make_demo(str(tmp_path / "data"), n=20, shard_size=10, image_size=16)
    p = cli("manifest", tmp_path / "data", "--out", tmp_path / "all.parquet")
    assert p.returncode == 0, p.stderr
    whole = pq.read_table(tmp_path / "all.parquet")
    meta = json.loads(whole.schema.metadata[tables.META_KEY])
    shards = sorted(set(whole.column("shard").to_pylist()))
    rng = np.random.default_rng(0)
    for i, s in enumerate(shards):
        part = whole.filter(pa.compute.equal(whole.column("shard").cast(pa.string()), s)).replace_schema_metadata(None)
        k = part.num_rows
        part = part.append_column("status", pa.array(["ok"] * k).dictionary_encode().cast(D)).append_column("error", pa.nulls(k, pa.string()))
        part = part.select(tables.BASE_COLUMNS).cast(tables.BASE_SCHEMA).append_column("el2n", pa.array(rng.random(k).astype(np.float32)))
        scoretable.write_part(str(tmp_path / "s"), i, part, {"rows": k})
    scoretable.write_table_meta(str(tmp_path / "s"), scoretable.score_table_meta(meta["source"], meta["classes"], shards,
                                                                                 {"el2n": {"params": {}}}))
    p = cli("select", tmp_path / "s", "--frac", "0.5", "--memory-limit", "1kB", "--out", tmp_path / "half.parquet")
    assert p.returncode == 0, p.stderr
    sel = pq.read_table(tmp_path / "half.parquet")
    mmeta = json.loads(sel.schema.metadata[tables.META_KEY])
    mmeta["rows"] = 0
    inp = arrange_inputs([str(tmp_path / "s")])[0]
    n = sum(t.num_rows for t in inp.pieces(["sample_id"]))
    ids = np.concatenate([t.column("sample_id").to_numpy() for t in inp.pieces(["sample_id"])]).astype(np.uint64)
    m = tmp_path / "empty.parquet"
    write_manifest(str(m), inp.schema, inp.pieces(MANIFEST_READ), ids, np.zeros(n, bool), {"el2n": np.zeros(n, np.float32)}, mmeta,
                   origin=str(tmp_path / "s"))
    ref = pq.read_table(m)
    assert ref.num_rows == 0 and ref.schema.remove_metadata() == sel.schema.remove_metadata()
    for who, g in _readers(m, tmp_path).items():
        _as_ref(ref, g, who)
    for to in ("wds", "parquet", "folder", "list"):
        p = cli("export", m, "--to", to, "--out", tmp_path / f"x-{to}")
        assert p.returncode == 0 and "Traceback" not in p.stderr, (to, p.stderr)
        assert "exported 0 samples" in p.stdout, (to, p.stdout)
