"""Score tables and manifests: schemas, metadata, atomic writers, readers.

Score table = a directory of ``part-NNNNNN.parquet`` (one per input shard, written atomically) each
followed by ``_done/part-NNNNNN.json`` (its counts), plus ``_dataprune.json`` (what made the table).
The underscore names keep ``pandas.read_parquet(dir)`` / ``pyarrow.dataset(dir)`` / DuckDB
``read_parquet('dir/*.parquet')`` reading only the parts.
Manifest = one parquet file of kept rows; its schema metadata (key ``dataprune``) holds the source
spec and the selection's parameters. Both are plain parquet that pyarrow/DuckDB/pandas read.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import tempfile
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import __version__
from .errors import TableError

META_KEY = b"dataprune"
META_FILE = "_dataprune.json"
DONE_DIR = "_done"
DIRECTION = "higher = harder"

_dict = pa.dictionary(pa.int32(), pa.string())
BASE_FIELDS = [
    pa.field("sample_id", pa.uint64(), nullable=False),
    pa.field("shard", _dict),
    pa.field("key", pa.string()),
    pa.field("label", pa.int32()),
    pa.field("loc_path", _dict),
    pa.field("loc_offset", pa.int64()),
    pa.field("loc_size", pa.int64()),
    pa.field("status", _dict),
    pa.field("error", pa.string()),
]
BASE_SCHEMA = pa.schema(BASE_FIELDS)
BASE_COLUMNS = [f.name for f in BASE_FIELDS]
LOCATION_COLUMNS = ["sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size"]
LABEL_MAX = (1 << 31) - 1  # the label column is int32


def label_fits(label: Any) -> bool:
    """Can the int32 label column hold ``label`` (an integer, or a float with an integral value)?"""
    if isinstance(label, (bool, np.bool_)):
        return False
    if isinstance(label, float):
        return math.isfinite(label) and label.is_integer() and -LABEL_MAX - 1 <= label <= LABEL_MAX
    return isinstance(label, numbers.Integral) and -LABEL_MAX - 1 <= int(label) <= LABEL_MAX


def mark_bad_label(s) -> bool:
    """A sample whose label the int32 column cannot hold: status ``bad_label`` (when it was ok) and no
    label. True when it was marked."""
    if s.label is None or label_fits(s.label):
        return False
    if s.status == "ok":
        s.status, s.error = "bad_label", f"{s.loc_path}: sample {s.key!r}: label {s.label!r} is not an int32 class index"
    s.label = None
    return True


class RowBuffer:
    """Accumulates the base columns of samples in plain lists (one shard at a time)."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {name: [] for name in BASE_COLUMNS}

    def add(self, s) -> None:
        c = self.cols
        mark_bad_label(s)  # the int32 column cannot hold it: a bad label, never a crash
        c["sample_id"].append(s.sample_id)
        c["shard"].append(s.shard)
        c["key"].append(s.key)
        c["label"].append(s.label)
        c["loc_path"].append(s.loc_path)
        c["loc_offset"].append(s.loc_offset)
        c["loc_size"].append(s.loc_size)
        c["status"].append(s.status)
        c["error"].append(s.error)

    def __len__(self) -> int:
        return len(self.cols["sample_id"])

    def table(self, extra: dict[str, pa.Array] | None = None) -> pa.Table:
        arrays = [pa.array(self.cols[f.name], type=f.type) for f in BASE_FIELDS]
        fields = list(BASE_FIELDS)
        for name, arr in (extra or {}).items():
            arrays.append(arr)
            fields.append(pa.field(name, arr.type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _tmp_path(path: str) -> str:
    d = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    return tmp


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def naming(path: str) -> Iterator[None]:
    """An OSError raised while writing ``path`` (disk full, EINVAL, a quota, Arrow's I/O errors, which
    carry no file name) names ``path``, so the CLI's one line says which file it was writing."""
    try:
        yield
    except OSError as e:
        if getattr(e, "filename", None):
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from None


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary name beside ``path`` to write to (unique, so runs sharing a directory cannot
    collide); renamed to ``path`` when the block ends, removed if it fails. OSErrors name ``path``."""
    with naming(path):
        tmp = _tmp_path(path)
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def with_metadata(table: pa.Table, meta: dict[str, Any]) -> pa.Table:
    existing = dict(table.schema.metadata or {})
    existing[META_KEY] = json.dumps(meta, sort_keys=True, default=str).encode()
    return table.replace_schema_metadata(existing)


def write_parquet_atomic(table: pa.Table, path: str, meta: dict[str, Any] | None = None, row_group_size: int | None = None) -> None:
    if meta is not None:
        table = with_metadata(table, meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")


MAX_JSON = 256 << 20  # a metadata file, marker or index larger than this is not one of ours


def load_json_file(path: str) -> Any:
    """A JSON document from a file others may have written: at most MAX_JSON bytes are read; too
    large, not UTF-8 JSON or nested too deeply is a ValueError (OSErrors pass)."""
    with open(path, "rb") as f:
        data = f.read(MAX_JSON + 1)
    if len(data) > MAX_JSON:
        raise ValueError(f"larger than {MAX_JSON >> 20} MiB")
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_parquet_meta(path: str) -> dict[str, Any]:
    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as e:
        raise TableError(f"{path}: not a readable parquet file ({e})") from None
    if META_KEY not in md:
        return {}
    try:
        return json.loads(md[META_KEY])
    except RecursionError:  # untrusted metadata nested too deeply: as unreadable as any other bad JSON
        raise ValueError(f"{path}: dataprune metadata nested too deeply") from None


def is_manifest(path: str) -> bool:
    """A parquet file whose dataprune metadata says it is a manifest — or is malformed (so that
    :func:`read_manifest` reports it instead of the file being read as a dataset)."""
    if not (os.path.isfile(path) and path.endswith(".parquet")):
        return False
    try:
        meta = read_parquet_meta(path)
    except TableError:
        return False
    except ValueError:  # not JSON, not UTF-8
        return True
    return not isinstance(meta, dict) or meta.get("kind") == "manifest"


def base_meta(kind: str, source_spec: dict[str, Any] | None, classes: list[str] | None, **extra: Any) -> dict[str, Any]:
    meta = {"kind": kind, "tool": "dataprune", "version": __version__, "source": source_spec, "classes": classes}
    meta.update(extra)
    return meta


# ----------------------------------------------------------------------------------- score tables

def part_name(shard_index: int) -> str:
    return f"part-{shard_index:06d}.parquet"


def done_name(shard_index: int) -> str:
    return os.path.join(DONE_DIR, f"part-{shard_index:06d}.json")


def write_part(out_dir: str, shard_index: int, table: pa.Table, stats: dict[str, Any]) -> None:
    """Write one shard's part, then its done-marker, each atomically (temporary name, fsync, rename).
    The marker records what verifies the part (rows, bytes, sha256), so a resume trusts a marker only
    with the part it describes; a kill between the two leaves a part without a marker: scored again."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    atomic_write_bytes(os.path.join(out_dir, part_name(shard_index)), data)
    os.makedirs(os.path.join(out_dir, DONE_DIR), exist_ok=True)
    record = {"rows": table.num_rows, "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_json(os.path.join(out_dir, done_name(shard_index)), {**stats, "part": record})


MARKER_RE = re.compile(r"part-(\d{6})\.json")


def marker_indices(out_dir: str) -> list[int]:
    """Shard indices of the files in ``OUT/_done`` named as markers (anything else there is ignored)."""
    try:
        names = os.listdir(os.path.join(out_dir, DONE_DIR))
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := MARKER_RE.fullmatch(n)))


def done_parts(out_dir: str) -> set[int]:
    """Shard indices with a marker and a part, unverified (``scoretable.finished_parts`` checks them)."""
    return {i for i in marker_indices(out_dir) if os.path.isfile(os.path.join(out_dir, part_name(i)))}


_MANIFEST_TYPES = {"sample_id": pa.uint64(), "shard": pa.string(), "key": pa.string(), "label": pa.int32(), "loc_path": pa.string(),
                   "loc_offset": pa.int64(), "loc_size": pa.int64()}


def read_manifest(path: str, columns: Iterable[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """A manifest's rows (``columns``, default all) and metadata. Manifests are untrusted input
    (hand-edited, or rewritten by pandas/polars): malformed metadata, missing columns and columns
    that do not cast safely to their types (ids to uint64, labels to int32, offsets and sizes to
    int64, names to UTF-8 strings; dictionary-encoded names stay so) are one-line TableErrors.
    Nulls and out-of-range values are the reader's to judge, row by row."""
    try:
        meta = read_parquet_meta(path)
    except ValueError as e:
        raise TableError(f"{path}: the manifest's dataprune metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != "manifest":
        raise TableError(f"{path}: not a dataprune manifest (no 'dataprune' metadata of kind 'manifest')")
    try:
        schema = pq.read_schema(path)
        wanted = list(columns) if columns else schema.names
        missing = [c for c in wanted if c not in schema.names]
        if missing:
            raise TableError(f"{path}: the manifest has no column {', '.join(map(repr, missing))}")
        table = pq.read_table(path, columns=wanted)
    except (OSError, pa.ArrowException, KeyError) as e:
        raise TableError(f"{path}: cannot read manifest ({e})") from None
    for i, name in enumerate(table.column_names):
        want = _MANIFEST_TYPES.get(name)
        col = table.column(i)
        if want is None or col.type == want:
            continue
        if want == pa.string() and pa.types.is_dictionary(col.type) and col.type.value_type == pa.string():
            continue
        if want == pa.string() and pa.types.is_dictionary(col.type):
            want = pa.dictionary(pa.int32(), pa.string())
        try:
            table = table.set_column(i, name, col.cast(want, safe=True))
        except (pa.ArrowException, ValueError, OverflowError) as e:
            raise TableError(f"{path}: column {name!r} is {col.type}, which does not convert to {want} "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return table, meta


def score_table_meta(source_spec: dict[str, Any] | None, classes: list[str] | None, shards: list[str],
                     metrics: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Content of ``dataprune.json``. ``metrics`` maps each metric column to
    ``{"direction": "higher = harder", "range": ..., "params": {...}}``."""
    import hashlib

    fp = hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]
    for m in metrics.values():
        m.setdefault("direction", DIRECTION)
    return base_meta("scores", source_spec, classes, shards=shards, shard_fingerprint=fp, metrics=metrics, **extra)


def write_table_meta(out_dir: str, meta: dict[str, Any]) -> None:
    atomic_write_json(os.path.join(out_dir, META_FILE), meta)


# --------------------------------------------------------------------- arrow ↔ numpy, columns

DEDUP_COLUMN = "is_duplicate"
DEDUP_AUX = ("dup_group", "dup_max_sim")  # dedup auxiliaries: usable with --by, never picked by default

# Arrow ↔ numpy on the buffers themselves. pyarrow's own helpers (to_numpy, to_pylist, pa.array,
# fill_null) import pandas on first use when it is installed — ~0.4 s, a fifth of a 10M-row select.

NP_TYPES = {pa.uint64(): np.uint64, pa.int64(): np.int64, pa.uint32(): np.uint32, pa.int32(): np.int32,
             pa.uint16(): np.uint16, pa.int16(): np.int16, pa.uint8(): np.uint8, pa.int8(): np.int8,
             pa.float32(): np.float32, pa.float64(): np.float64}


def _bits(buf: pa.Buffer, offset: int, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(buf, np.uint8), count=offset + n, bitorder="little")[offset:].view(bool)


def as_numpy(x: pa.Array | pa.ChunkedArray, fill: Any = None) -> np.ndarray:
    """A boolean or fixed-width numeric Arrow array as numpy (a read-only view when possible); nulls
    become ``fill``."""
    if isinstance(x, pa.ChunkedArray):
        parts = [as_numpy(c, fill) for c in x.chunks]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool if x.type == pa.bool_() else NP_TYPES[x.type])
    bufs = x.buffers()
    if x.type == pa.bool_():
        out = _bits(bufs[1], x.offset, len(x)) if len(x) else np.zeros(0, dtype=bool)
    else:
        dt = np.dtype(NP_TYPES[x.type])
        out = np.frombuffer(bufs[1], dtype=dt, count=len(x), offset=x.offset * dt.itemsize) if len(x) else np.zeros(0, dt)
    if x.null_count:
        if fill is None:
            raise ValueError("nulls need a fill value")
        out = np.where(_bits(bufs[0], x.offset, len(x)), out, np.asarray(fill, dtype=out.dtype))
    return out


def as_arrow(a: np.ndarray) -> pa.Array:
    """A numpy array as an Arrow array (zero-copy except booleans, which are bit-packed)."""
    if a.dtype == bool:
        return pa.Array.from_buffers(pa.bool_(), len(a), [None, pa.py_buffer(np.packbits(a, bitorder="little"))])
    return pa.Array.from_buffers(pa.from_numpy_dtype(a.dtype), len(a), [None, pa.py_buffer(np.ascontiguousarray(a))])


def dict_column(col) -> pa.DictionaryArray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    return arr
