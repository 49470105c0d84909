"""What the export checks in its input before writing anything, and what it says when it wrote less
than it was asked to.

A manifest is untrusted input (others make and edit them): its metadata must describe a source that
opens, its class names must be writable (``classes.txt`` is line-based), and every row's location
fields must be present and in range — a row that is not is a per-sample skip (``bad_row``,
``bad_location``) under ``--on-error skip`` and a TableError naming the row under ``raise``, so the
readers below never see a null, a negative offset or a 2⁴⁰-byte size. An export that skipped
anything ends with :class:`~dataprune.errors.Incomplete` (exit 8) after its output and ``index.json``
are complete, unless ``--allow-missing`` (``manifest.check_complete``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ConfigError, OnError, SourceError, TableError
from ..sources import Source, source_from_spec
from ..tables import as_arrow, as_numpy
from .base import ExportStats
from .names import text_problem

MAX_SAMPLE_BYTES = 1 << 32  # a location claiming more than 4 GiB for one sample is a broken row
MAX_OFFSET = 1 << 62
_SIMPLE = (str, int, float, bool, type(None))


def manifest_source(path: str, meta: dict[str, Any]) -> tuple[Source, list[str] | None]:
    """The source and class names a manifest's metadata records (TableError when they are unusable)."""
    spec = meta.get("source")
    if not spec:
        raise ConfigError(f"{path}: the manifest does not record its source dataset")
    opts = spec.get("options", {}) if isinstance(spec, dict) else None
    if not (isinstance(spec, dict) and isinstance(spec.get("format"), str) and isinstance(spec.get("path"), str)
            and "\x00" not in spec["path"] and isinstance(opts, dict)
            and all(isinstance(k, str) and isinstance(v, _SIMPLE) for k, v in opts.items())):
        raise TableError(f"{path}: the manifest's metadata has a malformed 'source' ({_short(spec)}); "
                         "expected {'format': str, 'path': str, 'options': {...}}")
    try:
        source = source_from_spec(spec)
    except (TypeError, ValueError, ConfigError) as e:
        raise TableError(f"{path}: the manifest's source {_short(spec)} cannot be opened ({e})") from None
    classes = meta.get("classes")
    if classes is None or classes == []:
        classes = source.classes
        check_classes(classes, f"{spec['path']}: class name", SourceError)
    else:
        check_classes(classes, f"{path}: the manifest's class name", TableError)
    return source, classes


def check_classes(classes: Any, where: str, error: type = SourceError) -> None:
    """Class names are written to ``classes.txt`` (one per line), parquet features and directory names."""
    if classes is None:
        return
    if not isinstance(classes, list):
        raise error(f"{where}s must be a list of strings, not {_short(classes)}")
    for i, c in enumerate(classes):
        why = text_problem(c)
        if why is not None:
            raise error(f"{where} {i} ({_short(c)}) {why}; it cannot be written")


def valid_rows(table: pa.Table, stats: ExportStats, on_error: OnError, path: str) -> pa.Table:
    """The rows whose location fields are usable; the others are counted (``bad_row`` for a null
    shard, key or sample_id, ``bad_location`` for a null, negative or oversized offset/size)."""
    n = table.num_rows
    if n == 0:
        return table
    bad_row = np.zeros(n, bool)
    for c in ("sample_id", "shard", "key"):
        bad_row |= _nulls(table.column(c))
    pnull, onull, snull = (_nulls(table.column(c)) for c in ("loc_path", "loc_offset", "loc_size"))
    off = as_numpy(table.column("loc_offset"), fill=0)
    size = as_numpy(table.column("loc_size"), fill=0)
    bad_loc = ~bad_row & (pnull | onull | snull | (off < 0) | (off > MAX_OFFSET) | (size < 0) | (size > MAX_SAMPLE_BYTES))
    bad = bad_row | bad_loc
    if not bad.any():
        return table
    rows = np.flatnonzero(bad)
    shards = table.column("shard").take(as_arrow(rows)).to_pylist()
    keys = table.column("key").take(as_arrow(rows)).to_pylist()
    for i, r in enumerate(rows.tolist()):
        if bad_row[r]:
            reason, what = "bad_row", "a null shard, key or sample_id"
        else:
            reason = "bad_location"
            what = (f"an unusable location (loc_offset {'null' if onull[r] else int(off[r])}, loc_size "
                    f"{'null' if snull[r] else int(size[r])}{', no loc_path' if pnull[r] else ''}; sizes above "
                    f"{MAX_SAMPLE_BYTES:,} bytes are refused)")
        msg = f"{path}: row {r} (shard {shards[i]!r}, key {keys[i]!r}) has {what}"
        if on_error.raises:
            raise TableError(msg)
        shard = shards[i] if isinstance(shards[i], str) else "<null shard>"
        stats.shard(shard)["seen"] += 1
        stats.skip(reason, msg, shard)
    return table.filter(as_arrow(~bad))


def _nulls(col) -> np.ndarray:
    return as_numpy(pc.is_null(col))


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."
