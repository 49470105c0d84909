"""Writing an export's rows: the row order, the per-sample path and the whole-dataset stream.

Every row has a position in the export's order and, from it, an output part
(:func:`~.base.plan_parts` of ``ExportConfig.shard_plan``): a process writing with ``rank, world``
takes the parts ``≡ rank (mod world)``, in order, and tells the writer each sample's part
(:attr:`~.base.Writer.part`), so a part's file is the same bytes whichever process wrote it.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import LOADER_SHARDS, MAX_SHARD_SAMPLES
from ..errors import OnError, SourceError
from ..ids import mix64
from ..sources import Source
from ..tables import RowBuffer, as_arrow, as_numpy, dict_column
from .base import ExportStats, Writer, plan_parts
from .names import sample_problem

CHUNK = 1024  # samples fetched per read batch on the per-sample path
CHUNK_BYTES = 64 << 20  # ... and at most this many bytes of samples (memory bound)
COUNT_LIMIT = LOADER_SHARDS * MAX_SHARD_SAMPLES  # beyond this many samples the default shard size is the maximum
COLUMNS = ["shard", "key", "label", "loc_path", "loc_offset", "loc_size", "sample_id"]


def count(source: Source, shards) -> int:
    """Samples a whole dataset will export, for the default shard sizes: the listed files of an image
    folder, else the readable samples (a first pass; stops at COUNT_LIMIT, beyond which the shard
    size no longer depends on the count; damaged shards are reported by the export pass)."""
    listed = _listed_files(shards)
    if listed is not None:
        return listed
    n = 0
    for shard in shards:
        try:
            for s in source.iter_samples(shard):
                n += s.ok
                if n >= COUNT_LIMIT:
                    return n
        except SourceError:
            continue
    return n


def _write(writer: Writer, stats: ExportStats, shard, key, label, members, src_path, progress, sid=None) -> None:
    t = time.perf_counter()
    bad = sample_problem(shard, key, members)  # the names every writer would write: one check for all of them
    if bad is not None:
        kept = not writer.refuse(shard, key, *bad)
    else:
        writer.sample_id = sid
        kept = writer.add(shard, key, label, members, src_path) is not False
    stats.write_s += time.perf_counter() - t
    nbytes = sum(len(v) for v in members.values())
    if kept:
        stats.samples += 1
        stats.bytes += nbytes
        stats.shard(shard)["kept"] += 1
    if progress:
        progress(1, nbytes)


def export_stream(source: Source, shards, writer: Writer, stats: ExportStats, on_error: OnError, progress,
                  plan: tuple[int, int]) -> None:
    """Whole dataset in source order, in one process: one sequential read of every shard; the
    readable samples take the positions (and parts) a :func:`listing` would give them."""
    folder = source.format == "folder"
    position = 0
    for shard in shards:
        it = source.iter_samples(shard)
        per = stats.shard(shard.name)
        while True:
            t = time.perf_counter()
            try:
                s = next(it)
            except StopIteration:
                break
            except SourceError as e:  # a damaged shard: the samples read before the damage are kept
                stats.at = position - 0.5
                on_error.shard(e)
                stats.shard_error(shard.name, e)
                break
            finally:
                stats.read_s += time.perf_counter() - t
            per["seen"] += 1
            if not s.ok:
                stats.at = position - 0.5  # where a listing puts it too
                on_error.sample(s)
                stats.skip(s.status, s.error, s.shard)
                continue
            writer.part, stats.at = int(plan_parts(position, plan)), position
            position += 1
            _write(writer, stats, s.shard, s.key, s.label, s.members, s.loc_path if folder else None, progress, s.sample_id)


def listing(source: Source, shards, stats: ExportStats, on_error: OnError) -> pa.Table:
    """Rows of every readable sample (for ``--shuffle`` of a whole dataset); problems counted here."""
    buf = RowBuffer()
    ok = 0
    for shard in shards:
        try:
            for s in source.iter_samples(shard):
                if s.ok:
                    buf.add(s)
                    ok += 1
                else:
                    stats.at = ok - 0.5  # messages in source order, as the stream writes them
                    stats.shard(s.shard)["seen"] += 1
                    on_error.sample(s)
                    stats.skip(s.status, s.error, s.shard)
        except SourceError as e:
            stats.at = ok - 0.5
            on_error.shard(e)
            stats.shard_error(shard.name, e)
    return buf.table()


def output_order(table: pa.Table, shuffle: bool, seed: int) -> np.ndarray:
    """Row order of the export: source order (shard, file, offset), or a seeded shuffle by sample_id."""
    if table.num_rows == 0:  # (an empty column's dictionary_encode would import pandas: ~0.15 s)
        return np.zeros(0, np.int64)
    if shuffle:
        return np.argsort(mix64(as_numpy(table.column("sample_id")), seed), kind="stable")
    offsets = as_numpy(table.column("loc_offset"))
    return np.lexsort((offsets, _string_ranks(table.column("loc_path")), _string_ranks(table.column("shard"))))


def _string_ranks(col) -> np.ndarray:
    """Per row, the rank of its (dictionary) string in sorted order: sorting strings via integers."""
    d = dict_column(col)
    values = d.dictionary
    rank = np.empty(len(values), np.int64)
    rank[as_numpy(pc.sort_indices(values))] = np.arange(len(values))
    return rank[as_numpy(d.indices)]


def chunks(order: np.ndarray, sizes: np.ndarray, rows: int):
    """Slices of ``order`` of at most ``rows`` rows and CHUNK_BYTES bytes (at least one row)."""
    cum = np.cumsum(sizes[order]) if len(order) else np.zeros(0, np.int64)
    start = 0
    while start < len(order):
        base = cum[start - 1] if start else 0
        end = int(np.searchsorted(cum, base + CHUNK_BYTES, side="right"))
        end = min(max(end, start + 1), start + rows, len(order))
        yield order[start:end]
        start = end


def export_rows(source: Source, table: pa.Table, order: np.ndarray, plan: tuple[int, int], writer: Writer, stats: ExportStats,
                on_error: OnError, progress, rank: int = 0, world: int = 1) -> None:
    """The rows of ``table`` at positions ``order`` whose part is ``≡ rank (mod world)``, in chunks; the
    writer's fast path takes what it can."""
    parts = plan_parts(np.arange(len(order)), plan)
    if world > 1:
        mine = parts % world == rank
        order, parts = order[mine], parts[mine]
    part_of_row = np.zeros(table.num_rows, np.int64)
    part_of_row[order] = parts
    pos_of_row = np.zeros(table.num_rows, np.int64)
    pos_of_row[order] = np.flatnonzero(mine) if world > 1 else np.arange(len(order))
    table = table.select(COLUMNS).append_column("part", as_arrow(part_of_row)).append_column("pos", as_arrow(pos_of_row))
    sizes = as_numpy(table.column("loc_size"))
    fast = writer.fast_path(source, progress)  # it reads by location too: only inside the dataset (untrusted manifests)

    def slow(sub: pa.Table) -> None:
        for start in range(0, sub.num_rows, CHUNK):
            slow_chunk(source, sub.slice(start, CHUNK), writer, stats, on_error, progress)

    try:
        for idx in chunks(order, sizes, fast.chunk_rows if fast is not None else CHUNK):
            sub = table.take(as_arrow(idx.astype(np.int64, copy=False)))
            if fast is not None:
                fast.run(sub, slow)
            else:
                slow(sub)
    finally:
        if fast is not None:
            fast.close()


def slow_chunk(source: Source, sub: pa.Table, writer: Writer, stats: ExportStats, on_error: OnError, progress) -> None:
    rows = {c: sub.column(c).to_pylist() for c in sub.column_names}
    folder = source.format == "folder"
    groups: dict[str, list[int]] = {}
    for j, p in enumerate(rows["loc_path"]):
        groups.setdefault(p, []).append(j)
    fetched: dict[int, dict[str, bytes]] = {}
    src_paths: dict[int, str] = {}  # the file each whole-file sample was read from (folder hard links)
    failed: dict[int, SourceError] = {}
    t = time.perf_counter()
    for path, js in groups.items():
        js.sort(key=lambda j: rows["loc_offset"][j] if isinstance(rows["loc_offset"][j], int) else -1)
        while js:  # after a failure, the row it names is skipped and the rest of the file is fetched again
            try:
                if not source.checks_locations:  # a plug-in source: the driver keeps reads inside the dataset
                    source.check_location(path, rows["key"][js[0]])
                for j, item in zip(js, source.fetch(path, [(rows["key"][j], rows["loc_offset"][j], rows["loc_size"][j]) for j in js])):
                    fetched[j] = item.members
                    src_paths[j] = getattr(item, "path", None) or path
                js = []
            except SourceError as e:
                if on_error.raises:
                    raise
                rest = [j for j in js if j not in fetched]
                if e.reason in ("missing_file", "bad_parquet", "unreadable", "not_tar", "outside_root"):  # the whole file
                    failed.update((j, e) for j in rest)
                    rest = []
                elif rest:
                    failed[rest[0]] = e
                    rest = rest[1:]
                js = rest
    stats.read_s += time.perf_counter() - t
    for j in range(sub.num_rows):
        shard = rows["shard"][j]
        writer.part, stats.at = rows["part"][j], rows["pos"][j]
        stats.shard(shard)["seen"] += 1
        if j in fetched:
            _write(writer, stats, shard, rows["key"][j], rows["label"][j], fetched[j], src_paths[j] if folder else None, progress,
                   rows["sample_id"][j])
        else:
            e = failed[j]
            stats.skip(e.reason, f"{e} (sample {rows['key'][j]!r} of {shard})", shard)


def listing_count(shards, table: pa.Table) -> int:
    """The count :func:`count` gives for the dataset whose :func:`listing` is ``table`` (the shard
    plan of a whole dataset is the same written by one process streaming or by several)."""
    listed = _listed_files(shards)
    return listed if listed is not None else min(table.num_rows, COUNT_LIMIT)


def _listed_files(shards) -> int | None:
    """The files an image folder's shards list (its sample count, known without reading); None for other sources."""
    return sum(len(sh.files) for sh in shards) if shards and all(sh.files for sh in shards) else None
