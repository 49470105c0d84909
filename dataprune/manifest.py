"""Manifests: the parquet file `export` reads — its sample locations plus the scores chosen by.

``build_manifest`` makes one straight from a dataset (all samples, or the ones a user's key file
lists); ``write_manifest`` streams the rows a selection kept out of a table's parts (`select`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from .errors import ConfigError, Incomplete, OnError, SourceError, TableError
from .tables import LOCATION_COLUMNS, META_KEY, RowBuffer, arrow_problem, as_arrow, as_numpy, as_sample_ids, base_meta, write_parquet_atomic

ROW_GROUP = 1 << 20  # manifest rows per row group
MANIFEST_READ = [c for c in LOCATION_COLUMNS if c != "sample_id"]  # the columns a manifest copies from its table


def read_key_file(path: str) -> tuple[str, set]:
    """A CSV or parquet file with a ``sample_id`` column (any type ``tables.as_sample_ids`` takes: other
    tools' integers, decimals, decimal strings), or ``key`` (and optionally ``shard``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--keys {path}: no such file")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            t = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            t = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(  # ids as text: as_sample_ids checks them
                column_types={"key": pa.string(), "shard": pa.string(), "sample_id": pa.string()}))
    except (pa.ArrowException, OSError) as e:
        raise ConfigError(f"--keys {path}: cannot read ({arrow_problem(e)})") from None
    names = t.column_names
    if "sample_id" in names:
        return "sample_id", set(as_numpy(as_sample_ids(t.column("sample_id"), f"--keys {path}")).tolist())
    if "key" in names and "shard" in names:
        return "shard_key", set(zip(t.column("shard").to_pylist(), t.column("key").to_pylist()))
    if "key" in names:
        return "key", set(t.column("key").to_pylist())
    raise ConfigError(f"--keys {path}: needs a 'sample_id' or 'key' column (has: {', '.join(names)})")


def build_manifest(
    data: str,
    out: str,
    *,
    format: str | None = None,
    source_options: dict[str, Any] | None = None,
    keys: str | None = None,
    on_error: str | None = None,
    allow_missing: bool = True,
) -> dict[str, Any]:
    """Write a manifest of every readable sample of ``data`` (or of the ones ``keys`` lists). When
    samples were left out (problems, damaged shards, listed keys not found) the complete manifest of
    the rest is written, and with ``allow_missing=False`` (the CLI's default) Incomplete (exit 8)
    raised; otherwise the result's counts say so."""
    policy = OnError(on_error)
    from .sources import open_source  # here: `select` writes manifests without the sources' imports

    source = open_source(data, format, **(source_options or {}))
    shards = source.list_shards()
    mode, wanted = read_key_file(keys) if keys else (None, None)
    buf = RowBuffer()
    skipped: Counter = Counter()
    shard_errors: list[dict[str, Any]] = []
    matched: set = set()
    for shard in shards:
        try:
            for s in source.iter_samples(shard):
                if not s.ok:
                    policy.sample(s)
                    skipped[s.status] += 1
                    continue
                if wanted is not None:
                    ident = s.sample_id if mode == "sample_id" else (s.shard, s.key) if mode == "shard_key" else s.key
                    if ident not in wanted:
                        continue
                    matched.add(ident)
                buf.add(s)
        except SourceError as e:  # a damaged shard: the samples before the damage are in the manifest
            policy.shard(e)
            shard_errors.append({"shard": shard.name, "reason": e.reason, "error": str(e)})
    table = buf.table().drop_columns(["status", "error"])
    missing = len(wanted) - len(matched) if wanted is not None else 0
    if table.num_rows == 0:
        raise TableError(f"{data}: no samples to put in the manifest" + (f" ({len(wanted)} keys in {keys} matched none)" if keys else ""))
    meta = base_meta("manifest", source.spec(), source.classes, selection={"strategy": "keys" if keys else "all", "keys_file": keys,
                     "keys_missing": missing}, rows=table.num_rows)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_parquet_atomic(table, out, meta)
    result = {"rows": table.num_rows, "skipped": dict(skipped), "shard_errors": shard_errors, "keys_missing": missing, "out": out}
    check_complete(result, out, allow_missing)
    return result


def check_complete(result: dict[str, Any], out: str, allow_missing: bool = False) -> None:
    """Raise Incomplete (exit 8; ``.result`` = ``result``) when a manifest's or an export's result
    says samples were left out — after the output is written — unless ``allow_missing``."""
    loss = describe_loss(result["skipped"], result["shard_errors"], result.get("keys_missing", 0))
    if loss and not allow_missing:
        what = f"export: {result['samples']} samples" if "samples" in result else f"manifest: {result['rows']} rows"
        e = Incomplete(f"{out}: incomplete {what} written, {loss}"
                       + (" (index.json lists them)" if "samples" in result else "") + "; pass --allow-missing to accept it")
        e.result = result  # type: ignore[attr-defined]
        raise e


def describe_loss(skipped: dict[str, int], shard_errors: list, keys_missing: int = 0) -> str:
    """``"3 samples left out (missing_file=2, unsafe_name=1), 1 damaged shard (a.tar: truncated_tar)"``, or ""."""
    parts = []
    if skipped:
        n = sum(skipped.values())
        parts.append(f"{n} sample{'s' if n != 1 else ''} left out (" + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) + ")")
    if shard_errors:
        shown = ", ".join(f"{e['shard']}: {e['reason']}" for e in shard_errors[:3]) + (", ..." if len(shard_errors) > 3 else "")
        parts.append(f"{len(shard_errors)} damaged shard{'s' if len(shard_errors) != 1 else ''} ({shown})")
    if keys_missing:
        parts.append(f"{keys_missing} listed key{'s' if keys_missing != 1 else ''} not found")
    return ", ".join(parts)


def write_manifest(out: str, schema: pa.Schema, pieces: Iterable[pa.Table], ids: np.ndarray, keep: np.ndarray,
                   score_cols: dict[str, np.ndarray], meta: dict[str, Any], *, origin: str) -> None:
    """Stream the kept rows of a table into the manifest ``out`` (a temporary name, renamed into place
    when complete). ``schema`` is the table's (it gives the types of the ``MANIFEST_READ`` columns);
    ``pieces`` yields those columns, in that order, part by part in table order, while ``ids``
    (uint64), ``keep`` (bool) and each of ``score_cols`` hold one entry per row of the whole table
    already in memory. ``meta`` is stored under the dataprune key; ``origin`` (the table's path) is
    named when the pieces do not add up to the rows."""
    def rows() -> Iterable[tuple[pa.Table, np.ndarray, np.ndarray, list[np.ndarray]]]:
        off = 0
        for piece in pieces:
            m = piece.num_rows
            if off + m > len(ids):
                raise TableError(f"{origin} changed while it was being read; run select again")
            yield piece, ids[off:off + m], keep[off:off + m], [a[off:off + m] for a in score_cols.values()]
            off += m
        if off != len(ids):
            raise TableError(f"{origin} changed while it was being read; run select again")

    write_manifest_rows(out, schema, {m: a.dtype for m, a in score_cols.items()}, rows(), meta)


def write_manifest_rows(out: str, schema: pa.Schema, score_types: dict[str, np.dtype],
                        rows: Iterable[tuple[pa.Table, np.ndarray, np.ndarray, list[np.ndarray]]],
                        meta: dict[str, Any]) -> None:
    """``write_manifest`` from per-part pieces: each of ``rows`` is (the part's ``MANIFEST_READ``
    columns, its ids, its kept rows, its score columns in ``score_types`` order) — what the
    out-of-core `select` streams, so both paths write the same file. Row groups are written on a
    background thread (the parquet writer releases the GIL) while the next parts are read and filtered."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    read_cols = MANIFEST_READ
    types = {f.name: f.type for f in schema}
    fields = [pa.field("sample_id", pa.uint64(), nullable=False)] + [pa.field(c, types[c]) for c in read_cols]
    fields += [pa.field(m, pa.from_numpy_dtype(dt)) for m, dt in score_types.items()]
    out_schema = pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})
    d = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=d)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    writer = None
    try:
        writer = pq.ParquetWriter(tmp, out_schema, **writer_options(out_schema))
        with ThreadPoolExecutor(1) as bg:
            pending: list[pa.Table] = []
            npending = 0
            writing = None
            for piece, pids, mask, scores in rows:
                m = piece.num_rows
                kept = int(np.count_nonzero(mask))
                if kept:
                    pm = as_arrow(mask)
                    arrays = [as_arrow(pids[mask])]
                    # one filter of the whole table builds its selection once, not once per column (0.6 × the time)
                    arrays += (piece.filter(pm) if kept < m else piece).columns
                    arrays += [as_arrow(a[mask]) for a in scores]
                    pending.append(pa.Table.from_arrays(arrays, schema=out_schema))
                    npending += kept
                if npending >= ROW_GROUP:
                    if writing is not None:
                        writing.result()  # at most one row group in flight: memory stays bounded
                    writing = bg.submit(_write_group, writer, pending)
                    pending, npending = [], 0
            if writing is not None:
                writing.result()
            if pending:
                _write_group(writer, pending)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def writer_options(schema: pa.Schema) -> dict[str, Any]:
    """The manifest's parquet encoding (``pq.ParquetWriter`` keywords) for its schema ``schema``:
    snappy (every parquet reader has it; zstd costs ~50 % more CPU here for ~25 % less disk); ids
    (hashes) and float scores do not compress, so they are stored plain; offsets and member sizes are
    delta-packed (sizes uncompressed: half the bytes of snappy at 0.55 × its encoding time)."""
    names = set(schema.names)
    plain = {"sample_id", "loc_size"} | {n for n in names if n not in LOCATION_COLUMNS}
    return {"compression": {n: "none" if n in plain else "snappy" for n in schema.names},
            "use_dictionary": [n for n in ("shard", "loc_path", "label") if n in names],
            "column_encoding": {n: "DELTA_BINARY_PACKED" for n in ("loc_offset", "loc_size") if n in names},
            "write_statistics": [n for n in schema.names if n == "label" or n not in LOCATION_COLUMNS]}


def _write_group(writer, pieces: list[pa.Table]) -> None:
    # One dictionary per column for the whole row group: with a different dictionary per chunk (each
    # part has its own) the parquet writer falls back to plain strings, ~5× slower and far larger.
    writer.write_table(pa.concat_tables(pieces).unify_dictionaries(), row_group_size=ROW_GROUP)
