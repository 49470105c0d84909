"""The SCORES arguments of `select`: our score tables, foreign CSV/TSV/parquet files, dataset listings.

``open_input`` recognises one argument and reads only its schema; ``Input.pieces`` streams chosen
columns part by part in table order (decoding ahead on a thread pool).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError, TableError
from ..scoretable import done_name, finished_parts, part_name, part_path, parts_dir, read_table_meta, table_root
from .foreign import NAME_COLUMNS, check_rows, metric_name, released, reverse, split_direction, stems
from ..tables import BASE_COLUMNS, BASE_SCHEMA, DEDUP_COLUMN, LABEL_MAX, PRED_LABEL, PRED_PROB, META_FILE, arrow_problem, as_arrow, as_numpy, as_sample_ids

FOREIGN_EXTS = (".csv", ".tsv", ".parquet")


@dataclass
class Input:
    """One SCORES argument: our score table (a directory), a foreign CSV/parquet file, or a dataset listing."""

    path: str
    kind: str  # "table" | "file" | "dataset"
    schema: pa.Schema
    metrics: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    parts: list[int] = field(default_factory=list)  # score tables: the shard index of each file
    table: pa.Table | None = None  # in memory: CSV files and dataset listings
    join_on: tuple[str, ...] = ("sample_id",)  # ("name",): file names matched by stem (foreign.stems)
    direction: str = "higher-is-harder"  # foreign files: as given; a higher-is-easier file is negated on reading

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    @property
    def has_locations(self) -> bool:
        return self.kind in ("table", "dataset")

    def read(self, columns: list[str]) -> pa.Table:
        """Only these columns, every row, in order."""
        if self.table is not None:
            return self.table.select(columns)
        parts = list(self.pieces(columns))
        try:
            return pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        except pa.ArrowInvalid as e:
            raise TableError(f"{self.path}: parts disagree on their columns ({e})") from None

    def num_rows(self) -> int:
        if self.table is not None:
            return self.table.num_rows
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.parquet as pq

        def rows(f: str) -> int:
            try:
                return pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowInvalid) as e:
                raise TableError(f"{f}: not a readable parquet file ({e})") from None

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            return sum(pool.map(rows, self.files))

    def pieces(self, columns: list[str], ahead: int | None = None) -> "Pieces":
        """The rows file by file, in order (see ``Pieces``). Reading starts at once."""
        return Pieces(self, columns, ahead)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        if self.kind == "table":
            with open(os.path.join(self.path, META_FILE), "rb") as f:
                h.update(f.read())
            for i, part in zip(self.parts, self.files):  # the same in either layout (parts/ or flat)
                with open(os.path.join(self.path, done_name(i)), "rb") as f:
                    h.update(part_name(i).encode() + b"\0" + f.read())
                h.update(str(os.path.getsize(part)).encode())
        elif self.kind == "file":
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(json.dumps(self.meta.get("source"), sort_keys=True).encode())
            h.update(str(self.table.num_rows if self.table is not None else 0).encode())
        return h.hexdigest()[:16]


class Pieces:
    """Iterate an input's rows as Arrow tables, one per part file, in table order. Files are decoded
    on a thread pool as soon as this object exists, at most ``ahead`` of them held besides the one in
    use, so a caller can start the reading of columns it needs later (stage 2) before a computation.
    (pyarrow.dataset is not used: the order of its batches is not part of its contract.)"""

    def __init__(self, inp: Input, columns: list[str], ahead: int | None = None):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.inp, self.columns = inp, columns
        self.pool = None
        self.todo: deque = deque()
        if inp.table is not None:
            return
        workers = min(8, os.cpu_count() or 1)
        self.inner = len(inp.files) < workers  # few big files: let each read use threads itself
        self.files = iter(inp.files)
        self.pool = ThreadPoolExecutor(workers)
        for f in itertools.islice(self.files, max(ahead or 0, 2 * workers)):
            self.todo.append(self.pool.submit(_read_parquet, f, columns, self.inner))

    def __iter__(self) -> Iterator[pa.Table]:
        if self.pool is None:
            yield self.inp.table.select(self.columns)
            return
        try:
            while self.todo:
                t = self.todo.popleft().result()
                nxt = next(self.files, None)
                if nxt is not None:
                    self.todo.append(self.pool.submit(_read_parquet, nxt, self.columns, self.inner))
                yield t
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.todo.clear()


def _read_parquet(path: str, columns: list[str], threads: bool) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        t = pq.ParquetFile(path).read(columns=columns, use_threads=threads)
    except (OSError, pa.ArrowException, KeyError, ValueError) as e:
        raise TableError(f"{path}: cannot read columns {', '.join(columns)} ({e})") from None
    missing = [c for c in columns if c not in t.column_names]  # (pyarrow leaves them out without a word)
    if missing:
        raise TableError(f"{path}: no column {', '.join(map(repr, missing))}, which the table's other parts have")
    return conform(path, t)


_TYPES = {f.name: f.type for f in BASE_SCHEMA}
_TYPES["label"] = pa.int32()


def conform(path: str, t: pa.Table, numbers: bool = True) -> pa.Table:
    """The columns of one file in the types dataprune uses — or a TableError naming the file and the
    column. Files come from other jobs and other tools (pandas, polars, DuckDB): ids are cast
    exactly to uint64 (``tables.as_sample_ids``: integers, decimals, decimal strings, exact floats;
    a negative, fractional, null or too large id is an error), names to strings, offsets to int64, ``is_duplicate`` to bool; metric columns must be
    numbers (unless ``numbers`` is False: a whole schema, whose other columns may be anything). A
    label that is no int32 class index (≥ 2^31, 2.7, inf) becomes null, and its row's status
    ``bad_label`` when the status is read alongside. Columns already in their type are untouched."""
    bad = None
    for i, name in enumerate(t.column_names):
        col, want = t.column(i), _TYPES.get(name)
        try:
            if name == "sample_id":
                col = as_sample_ids(col, path)
            elif name == "label":
                if col.type != want:
                    col, bad = _labels(col)
            elif want is not None:
                if col.type != want:
                    if pa.types.is_integer(want) and not (pa.types.is_integer(col.type) or pa.types.is_decimal(col.type)):
                        raise TypeError("not an integer column")
                    if pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
                        raise TypeError("not a string column")
                    if pa.types.is_dictionary(want) and not pa.types.is_dictionary(col.type):
                        col = col.cast(pa.string())
                    col = col.cast(want, safe=True)
            elif name == DEDUP_COLUMN:
                if col.type != pa.bool_():
                    if not pa.types.is_integer(col.type) or not set(pc.unique(col).to_pylist()) <= {0, 1, None}:
                        raise TypeError("not a boolean column")
                    col = col.cast(pa.bool_())
            elif numbers and not _is_metric_type(col.type):
                raise TypeError("a score column must hold numbers")
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
            raise TableError(f"{path}: column {name!r} is {t.schema.field(i).type}, not usable as {want or 'numbers'} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if col is not t.column(i):
            t = t.set_column(i, name, col)
    if bad is not None and bad.any() and "status" in t.column_names:
        j = t.column_names.index("status")
        status = pc.if_else(as_arrow(bad), pa.scalar("bad_label"), t.column(j).cast(pa.string())).cast(_TYPES["status"])
        t = t.set_column(j, "status", status)
    return t


def _conform_named(path: str, t: pa.Table) -> pa.Table:
    """``conform``, leaving file-name columns (``foreign.NAME_COLUMNS``) to be matched as text."""
    named = [c for c in t.column_names if c in NAME_COLUMNS]
    out = conform(path, t.drop_columns(named))
    for c in named:
        out = out.append_column(c, pc.cast(t.column(c), pa.string()))
    return out


def _labels(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Labels of another type as int32: (column, mask of the values that are no int32 class index → null)."""
    f = as_numpy(pc.cast(col, pa.float64(), safe=False), fill=np.nan)  # strings of digits parse; other text is an error
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(f) & (f == np.floor(f)) & (f >= -LABEL_MAX - 1) & (f <= LABEL_MAX)
    out = pc.if_else(as_arrow(ok), as_arrow(np.where(ok, f, 0).astype(np.int32)), pa.scalar(None, pa.int32()))
    return pa.chunked_array([out], pa.int32()), ~ok & ~np.isnan(f)


def _is_metric_type(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_decimal(t)


def open_input(path: str, direction: str = "higher-is-harder", expect_rows: int | None = None) -> Input:
    """Recognise one SCORES argument: our table directory (``OUT``, or ``OUT/parts``, which other tools
    read; either layout), or a foreign CSV/TSV/parquet file (``file.csv:easier`` gives its direction;
    see ``foreign``)."""
    path, direction = split_direction(path, direction)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path) and (os.path.exists(os.path.join(parent, META_FILE)) or table_root(parent) != parent):
        raise ConfigError(f"{path} is one part of the score table {table_root(parent)}: pass the table's directory instead")
    if os.path.isdir(path):
        path = table_root(path)
        meta = read_table_meta(path)
        parts = finished_parts(path, len(meta["shards"]) if "shards" in meta else None)
        if not parts:
            raise TableError(f"{path}: the score table has no finished parts")
        where = parts_dir(path)
        files = [part_path(path, i, where) for i in parts]
        import pyarrow.parquet as pq

        try:
            schema = conform(files[0], pq.read_schema(files[0]).empty_table(), numbers=False).schema
        except (OSError, pa.ArrowException) as e:
            raise TableError(f"{files[0]}: not a readable parquet file ({e})") from None
        missing = [c for c in ("sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size", "status")
                   if c not in schema.names]
        if missing:
            raise TableError(f"{path}: not a dataprune score table (parts lack {', '.join(missing)})")
        declared = meta.get("metrics") or {}
        metrics: dict[str, dict[str, Any]] = {}
        for f in schema:  # declared metric columns, and any other float column (usable with --by)
            if f.name in BASE_COLUMNS or f.name.endswith("_std") or f.name in (DEDUP_COLUMN, PRED_LABEL, PRED_PROB):
                continue
            if f.name in declared:
                if not _is_metric_type(f.type):
                    raise TableError(f"{files[0]}: the metric column {f.name!r} is {f.type}, not numbers")
                metrics[f.name] = {**declared[f.name], "declared": True}
            elif pa.types.is_floating(f.type):
                metrics[f.name] = {"declared": False}
        bad = [m for m, info in metrics.items() if info.get("direction", "higher = harder") != "higher = harder"]
        if bad:
            raise TableError(f"{path}: metric(s) {', '.join(bad)} are not 'higher = harder' in {META_FILE}")
        return Input(path=path, kind="table", schema=schema, metrics=metrics, meta=meta, files=files, parts=parts)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file or directory")
    low = path.lower()
    if not low.endswith(FOREIGN_EXTS):
        raise ConfigError(f"{path}: a score input is a score table directory or a {'/'.join(FOREIGN_EXTS)} file")
    table = None
    try:
        if low.endswith(".parquet"):
            import pyarrow.parquet as pq

            schema = conform(path, pq.read_schema(path).empty_table(), numbers=False).schema
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t" if low.endswith(".tsv") else ","),
                                  convert_options=pcsv.ConvertOptions(column_types={  # ids as text: as_sample_ids checks them
                                      "sample_id": pa.string(), "key": pa.string(), "shard": pa.string(), "label": pa.int32()}))
            if not (metric_name(path) and not {"sample_id", "key"} & set(table.column_names)):  # released: checked there
                table = _conform_named(path, table)
            schema = table.schema
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"{path}: cannot read ({arrow_problem(e)})") from None
    names = schema.names
    release = metric_name(path) is not None and table is not None and not {"sample_id", "key"} & set(names)
    if release:
        table = released(path, table, expect_rows)
        schema, names = table.schema, table.schema.names
    if "sample_id" in names:
        join_on: tuple[str, ...] = ("sample_id",)
    elif "key" in names and "shard" in names:
        join_on = ("shard", "key")
    elif "key" in names:
        join_on = ("key",)
    elif any(c in names for c in NAME_COLUMNS):
        join_on = ("name",)
        if not release:
            if table is None:
                table = _read_parquet(path, names, True)
            col = next(c for c in NAME_COLUMNS if c in names)
            table = table.drop_columns([c for c in ("name",) if c in names and c != col])
            table = table.set_column(table.column_names.index(col), "name", stems(table.column(col)))
            schema, names = table.schema, table.schema.names
    else:
        raise ConfigError(f"{path}: needs a 'sample_id', 'key' or file-name ({', '.join(NAME_COLUMNS)}) column to join on "
                          f"(has: {', '.join(names)})")
    if not release:
        import pyarrow.parquet as pq

        check_rows(path, table.num_rows if table is not None else pq.ParquetFile(path).metadata.num_rows, expect_rows)
    skip = set(BASE_COLUMNS) | {"sample_id", "shard", "key", "label", "name", "", "index", "Unnamed: 0"}
    metrics = {f.name: {"direction": "higher = harder (assumed)" if direction == "higher-is-harder" else
                        "higher = easier (negated on reading: higher = harder)", "declared": True}
               for f in schema if _is_metric_type(f.type) and f.name not in skip and not f.name.endswith("_std")}
    if direction == "higher-is-easier":
        if table is None:
            table = _read_parquet(path, names, True)
        table = reverse(table, list(metrics))
        schema = table.schema
    return Input(path=path, kind="file", schema=schema, metrics=metrics, files=[path], table=table, join_on=join_on,
                 direction=direction)


def list_dataset(data: str, format: str | None = None, source_options: dict[str, Any] | None = None) -> Input:
    """Every sample of a dataset (ids, labels, locations, status), for foreign scores that lack locations.
    Streams the whole dataset once; a score table is much faster when you have one."""
    from collections import Counter

    from ..errors import SourceError
    from ..sources import open_source
    from ..tables import RowBuffer

    source = open_source(data, format, **(source_options or {}))
    buf = RowBuffer()
    skipped: Counter = Counter()
    try:
        for shard in source.list_shards():
            try:
                for s in source.iter_samples(shard):
                    buf.add(s)
            except SourceError as e:
                skipped[e.reason] += 1
    finally:
        source.close()
    table = buf.table()
    meta = {"source": source.spec(), "classes": source.classes, "shard_errors": dict(skipped)}
    return Input(path=data, kind="dataset", schema=table.schema, metrics={}, meta=meta, table=table)
