"""Reading a score table as untrusted input: its metadata, its done-markers and its parts.

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
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import TableError
from .tables import META_FILE, done_name, load_json_file, marker_indices, part_name

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


def check_part(out_dir: str, idx: int, deep: bool) -> str | None:
    """Why part ``idx`` cannot be trusted, or None: its marker reads and the part is a regular file of
    the recorded size and (``deep``) sha256. Markers of older tables record no part: ``deep`` then
    compares the part's row count with the marker's ``seen``."""
    try:
        doc = read_marker(out_dir, idx)
    except TableError as e:
        return str(e)
    path = os.path.join(out_dir, part_name(idx))
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
    out = []
    for idx in marker_indices(out_dir):
        if shards is None or idx < shards:
            why = check_part(out_dir, idx, deep=False)
            if why:
                raise TableError(f"{why}; rerun the `dataprune score` command that made {out_dir} to rescore that shard")
            out.append(idx)
    return out


def verify_parts(out_dir: str, indices: Iterable[int]) -> tuple[set[int], dict[int, str]]:
    """For a resuming ``score``: of the shard ``indices`` that have a done-marker, those whose part
    verifies (sha256), and why each other one does not — its marker is removed, so the shard is
    scored again (and a kill before that finishes leaves it unfinished, not trusted)."""
    from concurrent.futures import ThreadPoolExecutor

    have = set(marker_indices(out_dir))
    todo = [i for i in indices if i in have]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashing releases the GIL
        found = dict(zip(todo, pool.map(lambda i: check_part(out_dir, i, deep=True), todo)))
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
    """Every finished part of a score table, as one Arrow table (only the given columns)."""
    parts = finished_parts(out_dir)
    if not parts:
        raise TableError(f"{out_dir}: the score table has no finished parts")
    files = [os.path.join(out_dir, part_name(i)) for i in parts]
    import pyarrow.dataset as ds

    try:
        return ds.dataset(files, format="parquet").to_table(columns=list(columns) if columns else None)
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"{out_dir}: cannot read its parts ({e})") from None
