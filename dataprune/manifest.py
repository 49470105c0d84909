"""Manifests made straight from a dataset: all samples, or the ones a user's key file lists."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError, SourceError, TableError
from .sources import open_source
from .tables import RowBuffer, base_meta, write_parquet_atomic


def read_key_file(path: str) -> tuple[str, set]:
    """A CSV or parquet file with a ``sample_id`` column, or ``key`` (and optionally ``shard``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--keys {path}: no such file")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            t = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            t = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
                column_types={"key": pa.string(), "shard": pa.string(), "sample_id": pa.uint64()}))
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"--keys {path}: cannot read ({e})") from None
    names = t.column_names
    if "sample_id" in names:
        return "sample_id", set(pc.cast(t.column("sample_id"), pa.uint64()).to_pylist())
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
    on_error: str = "skip",
) -> dict[str, Any]:
    if on_error not in ("skip", "raise"):
        raise ConfigError("--on-error must be 'skip' or 'raise'")
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
                    if on_error == "raise":
                        raise SourceError(s.error or f"{s.loc_path}: sample {s.key!r}: {s.status}", reason=s.status,
                                          path=s.loc_path)
                    skipped[s.status] += 1
                    continue
                if wanted is not None:
                    ident = s.sample_id if mode == "sample_id" else (s.shard, s.key) if mode == "shard_key" else s.key
                    if ident not in wanted:
                        continue
                    matched.add(ident)
                buf.add(s)
        except SourceError as e:  # a damaged shard: the samples before the damage are in the manifest
            if on_error == "raise":
                raise
            shard_errors.append({"shard": shard.name, "reason": e.reason, "error": str(e)})
    table = buf.table().drop_columns(["status", "error"])
    missing = len(wanted) - len(matched) if wanted is not None else 0
    if table.num_rows == 0:
        raise TableError(f"{data}: no samples to put in the manifest" + (f" ({len(wanted)} keys in {keys} matched none)" if keys else ""))
    meta = base_meta("manifest", source.spec(), source.classes, selection={"strategy": "keys" if keys else "all", "keys_file": keys,
                     "keys_missing": missing}, rows=table.num_rows)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_parquet_atomic(table, out, meta)
    return {"rows": table.num_rows, "skipped": dict(skipped), "shard_errors": shard_errors, "keys_missing": missing,
            "out": out}
