"""A score table: its layout, its writers, and reading it as untrusted input.

Layout of ``OUT``: ``parts/part-NNNNNN.parquet`` (one per input shard; nothing else is ever in
``parts/``: temporary files are made at OUT's top level under hidden names and renamed in), each
followed by ``_done/part-NNNNNN.json`` (its done-marker), ``_dataprune.json`` (what made the table),
and the run's other files, every one named with ``_`` or ``.`` (``.train/``, ``_proxy-runR.safetensors``,
``_embeddings/``, ``.dataprune.lock``). So polars ``scan_parquet("OUT/parts")``, DuckDB
``'OUT/parts/*.parquet'``, and pandas / ``pyarrow.dataset`` on ``OUT`` or ``OUT/parts`` read exactly
the table. Readers here take ``OUT`` or ``OUT/parts`` (``table_root``). Tables of dataprune 0.1 hold
their parts at OUT's top level (the flat layout, ``flat_parts``): still read, never written into.

A table comes from another job, another machine or another person. ``read_table_meta`` accepts
only a JSON object whose fields have the types dataprune writes; a done-marker is trusted only
together with the part it describes (``write_part`` records the part's rows, bytes and sha256).
Readers (``select``, ``curve``) get a TableError naming the file for a damaged table
(``finished_parts``); a resuming ``score`` verifies every marker it would skip and scores the
shard again when it does not verify (``verify_parts``). Nothing here raises anything but TableError.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import TableError
from .tables import DIRECTION, DONE_DIR, META_FILE, atomic_write_bytes, atomic_write_json, base_meta, load_json_file

PARTS_DIR = "parts"
PART_RE = re.compile(r"part-\d{6}\.parquet")
MARKER_RE = re.compile(r"part-(\d{6})\.json")


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:06d}.parquet"


def done_name(shard_index: int) -> str:
    return os.path.join(DONE_DIR, f"part-{shard_index:06d}.json")


def flat_parts(out_dir: str) -> bool:
    """A table in dataprune 0.1's flat layout: no ``parts/`` directory, and parts at OUT's top level."""
    try:
        return not os.path.isdir(os.path.join(out_dir, PARTS_DIR)) and any(PART_RE.fullmatch(n) for n in os.listdir(out_dir))
    except OSError:
        return False


def parts_dir(out_dir: str) -> str:
    """The directory holding a table's parts: ``OUT/parts``, or OUT itself in the flat layout."""
    return out_dir if flat_parts(out_dir) else os.path.join(out_dir, PARTS_DIR)


def part_path(out_dir: str, shard_index: int, where: str | None = None) -> str:
    """Part ``shard_index``'s file; ``where``: the table's ``parts_dir`` when the caller has it."""
    return os.path.join(where or parts_dir(out_dir), part_name(shard_index))


def table_root(path: str) -> str:
    """The table a reader was given as ``OUT`` or as ``OUT/parts`` (what polars and DuckDB read): OUT."""
    parent = os.path.dirname(os.path.abspath(path))
    if (os.path.basename(os.path.abspath(path)) == PARTS_DIR and not os.path.exists(os.path.join(path, META_FILE))
            and os.path.isfile(os.path.join(parent, META_FILE))):
        return parent
    return path


def write_part(out_dir: str, shard_index: int, table: pa.Table, stats: dict[str, Any]) -> None:
    """Write one shard's part into ``OUT/parts``, then its done-marker, each atomically (a temporary
    file at OUT's top level with a hidden name, fsync, rename). The marker records what verifies the
    part (rows, bytes, sha256), so a resume trusts a marker only with the part it describes; a kill
    between the two leaves a part without a marker: scored again."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    os.makedirs(os.path.join(out_dir, PARTS_DIR), exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, PARTS_DIR, part_name(shard_index)), data, tmp_dir=out_dir)
    os.makedirs(os.path.join(out_dir, DONE_DIR), exist_ok=True)
    record = {"rows": table.num_rows, "bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_json(os.path.join(out_dir, done_name(shard_index)), {**stats, "part": record})


def marker_indices(out_dir: str) -> list[int]:
    """Shard indices of the files in ``OUT/_done`` named as markers (anything else there is ignored)."""
    try:
        names = os.listdir(os.path.join(out_dir, DONE_DIR))
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names if (m := MARKER_RE.fullmatch(n)))


def done_parts(out_dir: str) -> set[int]:
    """Shard indices with a marker and a part, unverified (``finished_parts`` checks them)."""
    where = parts_dir(out_dir)
    return {i for i in marker_indices(out_dir) if os.path.isfile(part_path(out_dir, i, where))}


def score_table_meta(source_spec: dict[str, Any] | None, classes: list[str] | None, shards: list[str],
                     metrics: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """Content of ``_dataprune.json``. ``metrics`` maps each metric column to
    ``{"direction": "higher = harder", "range": ..., "params": {...}}``."""
    fp = hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]
    for m in metrics.values():
        m.setdefault("direction", DIRECTION)
    return base_meta("scores", source_spec, classes, shards=shards, shard_fingerprint=fp, metrics=metrics, **extra)


def write_table_meta(out_dir: str, meta: dict[str, Any]) -> None:
    atomic_write_json(os.path.join(out_dir, META_FILE), meta)


# ------------------------------------------------------------------------------------------ reading

def read_json(path: str) -> Any:
    """A JSON document from an untrusted file; anything unreadable is a TableError naming it."""
    try:
        return load_json_file(path)
    except (OSError, ValueError) as e:
        raise TableError(f"{path}: not a readable JSON file ({type(e).__name__}: {str(e)[:200]})") from None


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_marker(out_dir: str, idx: int) -> dict[str, Any]:
    """Part ``idx``'s done-marker: a JSON object whose ``part`` record (absent in older tables) is well-typed."""
    path = os.path.join(out_dir, done_name(idx))
    doc = read_json(path)
    rec = doc.get("part") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or (rec is not None and not (
            isinstance(rec, dict) and _count(rec.get("rows")) and _count(rec.get("bytes")) and isinstance(rec.get("sha256"), str))):
        raise TableError(f"{path}: not a done-marker written by dataprune")
    return doc


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_part(out_dir: str, idx: int, deep: bool, where: str | None = None) -> str | None:
    """Why part ``idx`` cannot be trusted, or None: its marker reads and the part is a regular file of
    the recorded size and (``deep``) sha256. Markers of older tables record no part: ``deep`` then
    compares the part's row count with the marker's ``seen``. ``where``: the table's ``parts_dir``."""
    try:
        doc = read_marker(out_dir, idx)
    except TableError as e:
        return str(e)
    path = part_path(out_dir, idx, where)
    if not os.path.isfile(path):
        return f"{path}: missing, but its done-marker exists"
    rec = doc.get("part")
    try:
        if rec is None:
            if deep and _count(doc.get("seen")):
                rows = pq.ParquetFile(path).metadata.num_rows
                if rows != doc["seen"]:
                    return f"{path}: {rows} rows, its done-marker says {doc['seen']}"
            return None
        size = os.path.getsize(path)
        if size != rec["bytes"]:
            return f"{path}: {size} bytes, its done-marker records {rec['bytes']} (truncated or replaced)"
        if deep and _sha256(path) != rec["sha256"]:
            return f"{path}: its sha256 differs from the one its done-marker records (the file was damaged)"
    except (OSError, pa.ArrowException) as e:
        return f"{path}: unreadable ({e})"
    return None


def finished_parts(out_dir: str, shards: int | None = None) -> list[int]:
    """The finished parts of a table, for a reader (select, curve): every marker must describe its
    part (by size; ``score`` checks the sha256), else the table is damaged — a TableError, never a
    silent gap. ``shards``: leave out markers of indices beyond the table's shard list."""
    out, where = [], parts_dir(out_dir)
    for idx in marker_indices(out_dir):
        if shards is None or idx < shards:
            why = check_part(out_dir, idx, deep=False, where=where)
            if why:
                raise TableError(f"{why}; rerun the `dataprune score` command that made {out_dir} to rescore that shard")
            out.append(idx)
    return out


def verify_parts(out_dir: str, indices: Iterable[int]) -> tuple[set[int], dict[int, str]]:
    """For a resuming ``score``: of the shard ``indices`` that have a done-marker, those whose part
    verifies (sha256), and why each other one does not — its marker is removed, so the shard is
    scored again (and a kill before that finishes leaves it unfinished, not trusted)."""
    from concurrent.futures import ThreadPoolExecutor

    have, where = set(marker_indices(out_dir)), parts_dir(out_dir)
    todo = [i for i in indices if i in have]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashing releases the GIL
        found = dict(zip(todo, pool.map(lambda i: check_part(out_dir, i, deep=True, where=where), todo)))
    bad = {i: why for i, why in found.items() if why is not None}
    for idx in bad:
        os.unlink(os.path.join(out_dir, done_name(idx)))
    return {i for i, why in found.items() if why is None}, bad


_META_FIELDS = {"kind": str, "version": str, "source": (dict, type(None)), "classes": (list, type(None)), "shards": list,
                "shard_fingerprint": str, "metrics": dict, "config": dict, "data_fingerprint": str,
                "checkpoint_sha256": (str, type(None)), "reliability": dict}


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    for k, t in _META_FIELDS.items():
        if k in meta and not isinstance(meta[k], t):
            return f"its field {k!r} is a {type(meta[k]).__name__}"
    if meta.get("kind", "scores") != "scores":
        return f"describes a {meta['kind']!r}, not a score table"
    for k in ("classes", "shards"):
        if not all(isinstance(x, str) for x in meta.get(k) or []):
            return f"its field {k!r} holds non-strings"
    for name, m in (meta.get("metrics") or {}).items():
        rng = m.get("range") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not isinstance(m.get("direction", ""), str) or not isinstance(m.get("params", {}), dict) or (
                rng is not None and not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, (int, float)) for x in rng))):
            return f"its entry for metric {name!r} is malformed"
    return None


def read_table_meta(out_dir: str) -> dict[str, Any]:
    """``OUT/_dataprune.json``, checked: a JSON object whose fields have the types dataprune writes."""
    path = os.path.join(out_dir, META_FILE)
    if not os.path.isfile(path):
        raise TableError(f"{out_dir}: not a dataprune score table (no {META_FILE})")
    meta = read_json(path)
    why = _meta_problem(meta)
    if why:
        raise TableError(f"{path}: not dataprune score-table metadata ({why})")
    return meta


def read_score_table(out_dir: str, columns: Iterable[str] | None = None) -> pa.Table:
    """Every finished part of a score table (``OUT`` or ``OUT/parts``), as one Arrow table (only the given columns)."""
    out_dir = table_root(out_dir)
    parts = finished_parts(out_dir)
    if not parts:
        raise TableError(f"{out_dir}: the score table has no finished parts")
    where = parts_dir(out_dir)
    files = [part_path(out_dir, i, where) for i in parts]
    import pyarrow.dataset as ds

    try:
        return ds.dataset(files, format="parquet").to_table(columns=list(columns) if columns else None)
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"{out_dir}: cannot read its parts ({e})") from None
