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

import pyarrow as pa

from ..errors import ConfigError, TableError
from ..tables import BASE_COLUMNS, DEDUP_COLUMN, META_FILE, done_name, done_parts, part_name, read_table_meta

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
    table: pa.Table | None = None  # in memory: CSV files and dataset listings
    join_on: tuple[str, ...] = ("sample_id",)

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
            for i in sorted(done_parts(self.path)):
                with open(os.path.join(self.path, done_name(i)), "rb") as f:
                    h.update(part_name(i).encode() + b"\0" + f.read())
                h.update(str(os.path.getsize(os.path.join(self.path, part_name(i)))).encode())
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
        return pq.ParquetFile(path).read(columns=columns, use_threads=threads)
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise TableError(f"{path}: cannot read columns {', '.join(columns)} ({e})") from None


def _is_metric_type(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def open_input(path: str) -> Input:
    """Recognise one SCORES argument (our table directory, or a foreign CSV/TSV/parquet file)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path) and os.path.exists(os.path.join(parent, META_FILE)):
        raise ConfigError(f"{path} is one part of the score table {parent}: pass the table's directory instead")
    if os.path.isdir(path):
        meta = read_table_meta(path)
        parts = sorted(done_parts(path))
        if not parts:
            raise TableError(f"{path}: the score table has no finished parts")
        files = [os.path.join(path, part_name(i)) for i in parts]
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(files[0])
        except (OSError, pa.ArrowInvalid) as e:
            raise TableError(f"{files[0]}: not a readable parquet file ({e})") from None
        missing = [c for c in ("sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size", "status")
                   if c not in schema.names]
        if missing:
            raise TableError(f"{path}: not a dataprune score table (parts lack {', '.join(missing)})")
        declared = meta.get("metrics") or {}
        metrics: dict[str, dict[str, Any]] = {}
        for f in schema:  # declared metric columns, and any other float column (usable with --by)
            if f.name in BASE_COLUMNS or f.name.endswith("_std") or f.name == DEDUP_COLUMN:
                continue
            if f.name in declared:
                metrics[f.name] = {**declared[f.name], "declared": True}
            elif pa.types.is_floating(f.type):
                metrics[f.name] = {"declared": False}
        bad = [m for m, info in metrics.items() if info.get("direction", "higher = harder") != "higher = harder"]
        if bad:
            raise TableError(f"{path}: metric(s) {', '.join(bad)} are not 'higher = harder' in {META_FILE}")
        return Input(path=path, kind="table", schema=schema, metrics=metrics, meta=meta, files=files)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file or directory")
    low = path.lower()
    if not low.endswith(FOREIGN_EXTS):
        raise ConfigError(f"{path}: a score input is a score table directory or a {'/'.join(FOREIGN_EXTS)} file")
    table = None
    try:
        if low.endswith(".parquet"):
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t" if low.endswith(".tsv") else ","),
                                  convert_options=pcsv.ConvertOptions(column_types={
                                      "sample_id": pa.uint64(), "key": pa.string(), "shard": pa.string(), "label": pa.int32()}))
            schema = table.schema
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    names = schema.names
    if "sample_id" in names:
        join_on: tuple[str, ...] = ("sample_id",)
    elif "key" in names and "shard" in names:
        join_on = ("shard", "key")
    elif "key" in names:
        join_on = ("key",)
    else:
        raise ConfigError(f"{path}: needs a 'sample_id' or 'key' column to join on (has: {', '.join(names)})")
    skip = set(BASE_COLUMNS) | {"sample_id", "shard", "key", "label"}
    metrics = {f.name: {"direction": "higher = harder (assumed)", "declared": True} for f in schema if _is_metric_type(f.type)
               and f.name not in skip and not f.name.endswith("_std")}
    return Input(path=path, kind="file", schema=schema, metrics=metrics, files=[path], table=table, join_on=join_on)


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
