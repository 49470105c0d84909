"""Tables: schemas, metadata, atomic writers, manifests, sample ids from other tools, Arrow ↔ numpy.

Manifest = one parquet file of kept rows; its schema metadata (key ``dataprune``) holds the source
spec and the selection's parameters: plain parquet that pyarrow/DuckDB/pandas/polars read. A score
table's layout and parts are ``scoretable``'s (names: ``META_FILE``, ``DONE_DIR`` here).
"""

from __future__ import annotations

import json
import math
import numbers
import os
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


def _tmp_path(path: str, tmp_dir: str | None = None) -> str:
    d = tmp_dir or os.path.dirname(os.path.abspath(path)) or "."
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
def atomic_path(path: str, tmp_dir: str | None = None) -> Iterator[str]:
    """A temporary name beside ``path`` (or in ``tmp_dir``, on the same filesystem) to write to (unique,
    so runs sharing a directory cannot collide); renamed to ``path`` when the block ends, removed if it
    fails. OSErrors name ``path``."""
    with naming(path):
        tmp = _tmp_path(path, tmp_dir)
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: str, data: bytes, tmp_dir: str | None = None) -> None:
    with atomic_path(path, tmp_dir) as tmp, open(tmp, "wb") as f:
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


IDS_HELP = "sample ids are uint64 (0 ≤ id < 2**64): write them as unsigned integers or decimal strings"


def _why_not_id(v: Any) -> str | None:
    try:
        n = int(v) if isinstance(v, str) and v.isascii() and v.lstrip("-").isdigit() else v
        return None if 0 <= n < 1 << 64 and n == int(n) else "not a whole number" if n != int(n) else "negative" if n < 0 else "≥ 2**64"
    except (TypeError, ValueError, OverflowError):
        return "not a whole number"


def as_sample_ids(col: pa.Array | pa.ChunkedArray, where: str, column: str = "sample_id") -> pa.ChunkedArray:
    """Ids written by another tool as uint64, exactly — the one conversion for every foreign id column —
    or a TableError naming ``where`` (the file), the column and its first bad value. Accepted: integers
    of any width, decimals and decimal strings (DuckDB's HUGEINT, polars' Int128 as decimal(38,0), a
    CSV's integers ≥ 2**63), 16-byte fixed-size binary (an Int128 in Arrow's little-endian layout: big-
    endian bytes read as ≥ 2**64, refused, never misread) and floats when every value is an integer
    below 2**53. Refused: nulls, fractions, ≥ 2**64, and negative ids (an id ≥ 2**63 whose bits were
    reinterpreted as int64 cannot be told from a negative number: not guessed)."""
    col = col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])
    t = col.type
    col = col.cast(t.value_type) if pa.types.is_dictionary(t) else col

    def fail(i: int, v: Any, why: str | None) -> None:
        raise TableError(f"{where}: column {column!r} ({t}): row {i} holds {v!r}, {why}; {IDS_HELP}")

    if col.null_count:
        fail(int(as_numpy(pc.is_null(col)).argmax()), None, "a null")
    if pa.types.is_floating(col.type):
        f = as_numpy(col.cast(pa.float64()))
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(f) & (f == np.floor(f)) & (f >= 0) & (f < 2.0 ** 53)
        if not ok.all():
            i = int(np.argmin(ok))
            fail(i, float(f[i]), _why_not_id(f[i]) or "a float: exact as an id only below 2**53 (DuckDB writes HUGEINT to parquet as "
                 "double: cast it to UBIGINT)")
        return pa.chunked_array([as_arrow(f.astype(np.uint64))])
    if pa.types.is_fixed_size_binary(col.type) and col.type.byte_width == 16:
        a = col.combine_chunks()
        w = np.frombuffer(a.buffers()[1], "<u8", 2 * len(a), a.offset * 16).reshape(-1, 2) if len(a) else np.zeros((0, 2), "<u8")
        if w[:, 1].any():
            i = int(np.argmax(w[:, 1] != 0))
            v = int.from_bytes(a[i].as_py(), "little", signed=True)
            fail(i, v, _why_not_id(v))
        return pa.chunked_array([as_arrow(w[:, 0].astype(np.uint64))])
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_string_view(col.type):
        col = pc.utf8_trim_whitespace(col)
    elif not (pa.types.is_integer(col.type) or pa.types.is_decimal(col.type)):
        raise TableError(f"{where}: column {column!r} is {t}, not integers; {IDS_HELP}")
    try:
        return pc.cast(col, pa.uint64(), safe=True)
    except pa.ArrowException:  # name the first value that does not convert (only on this failure path)
        flat = col.combine_chunks()
        for s in range(0, len(flat), 1 << 16):
            for i, v in enumerate(flat.slice(s, 1 << 16).to_pylist(), s):
                if _why_not_id(v):
                    fail(i, v, _why_not_id(v))
        raise


def arrow_problem(e: Exception) -> str:
    """An Arrow read error as one line; polars' Int128 columns, which pyarrow cannot read, say what to do."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg + (" (a polars Int128 column? write ids as UInt64 or decimal strings)" if "more than 64 bits" in msg else "")


def read_parquet_meta(path: str) -> dict[str, Any]:
    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"{path}: not a readable parquet file ({arrow_problem(e)})") from None
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
        with pq.ParquetFile(path) as f:  # not pq.read_table: it goes through pyarrow.dataset, which imports pandas (~0.15 s)
            table = f.read(columns=wanted)
    except (OSError, pa.ArrowException, KeyError) as e:
        raise TableError(f"{path}: cannot read manifest ({arrow_problem(e)})") from None
    for i, name in enumerate(table.column_names):
        want = _MANIFEST_TYPES.get(name)
        col = table.column(i)
        if want is None or col.type == want:
            continue
        if name == "sample_id" and not col.null_count:  # null ids are the reader's, row by row (bad_row)
            table = table.set_column(i, name, as_sample_ids(col, path))
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
    for name in ("shard", "key", "loc_path"):  # Arrow does not check UTF-8 on read: bad bytes would raise later, mid-export
        if name in table.column_names:
            for chunk in table.column(name).chunks:
                try:
                    (chunk.dictionary if pa.types.is_dictionary(chunk.type) else chunk).validate(full=True)
                except pa.ArrowInvalid as e:
                    raise TableError(f"{path}: column {name!r} holds bytes that are not UTF-8 text ({str(e).splitlines()[0]})") from None
    return table, meta


# --------------------------------------------------------------------- arrow ↔ numpy, columns

DEDUP_COLUMN = "is_duplicate"
DEDUP_AUX = ("dup_group", "dup_max_sim")  # dedup auxiliaries: usable with --by, never picked by default
PRED_LABEL, PRED_PROB = "pred_label", "pred_prob"  # the scoring classifier's own answer (argmax, its probability): never a score

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
