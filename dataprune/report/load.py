"""What a report reads: a score table's columns as numpy arrays (never a Python object per row), its
metadata, and the optional manifest and pruning curve — all untrusted input.

Strings (keys, shards, locations) stay Arrow arrays; only the rows a page shows are turned into
Python values (``Table.rows``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError, TableError
from ..scoretable import read_score_table, read_table_meta, table_root
from ..tables import BASE_COLUMNS, PRED_LABEL, PRED_PROB, as_numpy, read_manifest

DYNAMICS = ("forgetting", "aum", "el2n")  # training-dynamics metrics: their hardest rows are label-noise suspects
PRED = (PRED_LABEL, PRED_PROB)  # written by score beside the eval metrics of a classifier
DUP = ("dup_group", "dup_max_sim", "is_duplicate")
SHOWN = ("sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size", "status", "error")


@dataclass
class Table:
    """A score table as the report uses it."""

    path: str
    meta: dict[str, Any]
    n: int
    ids: np.ndarray  # uint64
    labels: np.ndarray | None  # int64, -1 = no label; None when no row has a label
    ok: np.ndarray  # bool: status "ok"
    status: pa.ChunkedArray
    metrics: dict[str, np.ndarray]  # score column → float64 values (NaN = not scored)
    info: dict[str, dict]  # score column → its metadata entry (range, direction, params)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # pred_*, dup_* columns present
    shown: pa.Table | None = None  # the SHOWN columns (strings stay Arrow)
    classes: list[str] = field(default_factory=list)

    def class_name(self, label: int | None) -> str:
        if label is None or label < 0:
            return "(no label)"
        return self.classes[label] if label < len(self.classes) else str(label)

    def rows(self, idx: np.ndarray) -> list[dict[str, Any]]:
        """The shown columns of the rows ``idx`` as Python dicts (only for what the page shows)."""
        if self.shown is None or len(idx) == 0:
            return []
        return self.shown.take(pa.array(np.asarray(idx, np.int64))).to_pylist()


def _floating(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def read_table(path: str, by: tuple[str, ...] | None = None) -> Table:
    """The columns a report needs from the score table ``path`` (``OUT`` or ``OUT/parts``)."""
    if os.path.isfile(path):
        raise ConfigError(f"{path}: a report reads a score table directory (the --out of `dataprune score`), not a file")
    root = table_root(path)
    meta = read_table_meta(root)
    declared = meta.get("metrics") or {}
    import pyarrow.dataset as ds

    from ..scoretable import finished_parts, part_path, parts_dir

    parts = finished_parts(root)
    where = parts_dir(root)
    try:
        schema = ds.dataset([part_path(root, i, where) for i in parts[:1]], format="parquet").schema if parts else pa.schema([])
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"{root}: cannot read its parts ({e})") from None
    names = set(schema.names)
    missing = [c for c in ("sample_id", "key", "status") if c not in names]
    if missing and parts:
        raise TableError(f"{root}: not a dataprune score table (parts lack {', '.join(missing)})")
    score_cols = [c for c in schema.names if isinstance(declared.get(c), dict) and "columns" not in declared[c]  # (flags: dedup)
                  and c not in PRED + DUP and _floating(schema.field(c).type)]
    score_cols += [c for c in schema.names if c not in declared and c not in BASE_COLUMNS and c not in PRED + DUP
                   and not c.endswith("_std") and pa.types.is_floating(schema.field(c).type)]
    if by:
        unknown = [b for b in by if b not in score_cols]
        if unknown:
            raise ConfigError(f"--by {','.join(unknown)}: not a metric column of {root} (has: {', '.join(score_cols) or 'none'})")
        score_cols = list(by)
    extra_cols = [c for c in PRED + DUP if c in names]
    shown_cols = [c for c in SHOWN if c in names]
    t = read_score_table(root, columns=list(dict.fromkeys(shown_cols + score_cols + extra_cols)))
    n = t.num_rows
    ids = as_numpy(t["sample_id"]).astype(np.uint64, copy=False) if "sample_id" in names else np.arange(n, dtype=np.uint64)
    labels = None
    if "label" in names:
        lab = t["label"]
        if lab.null_count < n:
            labels = as_numpy(pc.fill_null(lab.cast(pa.int64()), -1)).astype(np.int64, copy=False)
    status = t["status"].cast(pa.string())
    ok = as_numpy(pc.fill_null(pc.equal(status, "ok"), False)).astype(bool)
    metrics = {c: _floats(t[c]) for c in score_cols}
    extra = {c: (_floats(t[c]) if c != "is_duplicate" else as_numpy(pc.fill_null(t[c], False)).astype(bool)) for c in extra_cols}
    classes = [c for c in (meta.get("classes") or []) if isinstance(c, str)]
    info = {c: declared.get(c) if isinstance(declared.get(c), dict) else {} for c in score_cols}
    return Table(root, meta, n, ids, labels, ok, status, metrics, info, extra, t.select(shown_cols), classes)


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return as_numpy(pc.fill_null(col.cast(pa.float64()), float("nan"))).astype(np.float64, copy=False)


def reasons(t: Table) -> dict[str, int]:
    """Rows that could not be scored, by reason (status), largest first."""
    if t.n == 0 or t.ok.all():
        return {}
    vc = pc.value_counts(t.status.filter(pa.array(~t.ok))).to_pylist()
    return dict(sorted(((str(d["values"]), int(d["counts"])) for d in vc), key=lambda kv: -kv[1]))


@dataclass
class Manifest:
    path: str
    ids: np.ndarray  # uint64, the kept rows
    meta: dict[str, Any]


def read_kept(path: str) -> Manifest:
    """A manifest's kept sample ids and its metadata (selection summary, strata)."""
    from ..tables import as_sample_ids

    table, meta = read_manifest(path, columns=["sample_id"])
    ids = as_numpy(as_sample_ids(table["sample_id"], path)).astype(np.uint64, copy=False)
    return Manifest(path, ids, meta if isinstance(meta, dict) else {})


def read_curve(curve_dir: str) -> pa.Table:
    """``CURVE_DIR/curve.parquet`` (or ``curve.csv``): strategy, fraction, test_error per unit."""
    pq_path, csv_path = os.path.join(curve_dir, "curve.parquet"), os.path.join(curve_dir, "curve.csv")
    try:
        if os.path.isfile(pq_path):
            import pyarrow.parquet as pq

            t = pq.read_table(pq_path)
        elif os.path.isfile(csv_path):
            import pyarrow.csv as pcsv

            t = pcsv.read_csv(csv_path)
        else:
            raise ConfigError(f"--curve {curve_dir}: no curve.parquet or curve.csv there (the --out of `dataprune curve`)")
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"--curve {curve_dir}: cannot read the curve ({e})") from None
    missing = [c for c in ("strategy", "fraction", "test_error") if c not in t.column_names]
    if missing:
        raise TableError(f"--curve {curve_dir}: the curve lacks column(s) {', '.join(missing)}")
    return t
