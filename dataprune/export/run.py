"""The export driver: read a manifest (or a whole dataset), put the rows in output order, hand the
samples to the writer ``--to`` names, publish the result with ``index.json`` last.

It knows writers only through :mod:`.base` (the registry and the :class:`~.base.Writer` hooks),
never a concrete writer. The whole run holds the output lock; the writer builds the export in a
staging directory inside ``--out`` that :mod:`.outdir` publishes when it is complete, so an
interrupted export (exception, Ctrl-C, SIGTERM or SIGKILL) never leaves a directory that looks
finished, and an earlier export's files are removed only when its record proves they are ours.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import LOADER_SHARDS, MAX_SHARD_SAMPLES, ExportConfig
from ..errors import OnError, SourceError
from ..ids import mix64
from ..manifest import check_complete
from ..outlock import output_lock
from ..sources import Source, open_source
from ..tables import LOCATION_COLUMNS, RowBuffer, dict_column, is_manifest, read_manifest
from .base import ExportStats, Writer, writer_class
from .checks import check_classes, manifest_source, valid_rows
from .names import sample_problem
from .outdir import OutDir

CHUNK = 1024  # samples fetched per read batch on the per-sample path
CHUNK_BYTES = 64 << 20  # ... and at most this many bytes of samples (memory bound)
COUNT_LIMIT = LOADER_SHARDS * MAX_SHARD_SAMPLES  # beyond this many samples the default shard size is the maximum


def export(
    input_path: str,
    cfg: ExportConfig,
    *,
    format: str | None = None,
    source_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
    allow_missing: bool = True,
) -> dict[str, Any]:
    """Export a manifest (or, when ``input_path`` is a dataset, the whole dataset) into ``cfg.out``.

    ``overwrite``: export into a directory holding files dataprune did not write (they are kept;
    only files at the names the export writes are replaced). ``allow_missing=False`` (the CLI's
    default, ``--allow-missing`` off) raises Incomplete (exit 8) once the output is complete when
    samples were left out; the library's default returns the index, whose counts say so.

    Without ``cfg.shard_size`` a sharded writer's shard sizes come from the number of samples to
    export (``ExportConfig.shard_plan``): the manifest's rows, or for a whole dataset its files
    (image folders) or its readable samples, counted in a first pass that stops at 160,000. The
    index's ``notes`` (one line each) say e.g. that fewer than 16 shards were written."""
    writer_cls = writer_class(cfg.to)  # --to is checked by the registry, before anything is written
    cfg.validate()
    on_error = OnError(cfg.on_error)
    if is_manifest(input_path):
        table, meta = read_manifest(input_path, LOCATION_COLUMNS)
        source, classes = manifest_source(input_path, meta)
        origin = {"manifest": os.path.abspath(input_path)}
    else:
        source = open_source(input_path, format, **(source_options or {}))
        shards = source.list_shards()
        table = None
        classes = source.classes
        check_classes(classes, f"{input_path}: class name")
        origin = {"dataset": input_path}
    stats = ExportStats()
    t0 = time.perf_counter()
    try:
        if table is not None:
            loc_paths = [p for p in table.column("loc_path").unique().to_pylist() if isinstance(p, str)] if table.num_rows else []
            source.refuse_output_inside(cfg.out, loc_paths)
        else:
            source.refuse_output_inside(cfg.out, [s.path for s in shards])
        with output_lock(cfg.out, "export"):
            out = OutDir(cfg.out, writer_cls, cfg.prefix, overwrite)
            try:
                writer = writer_cls(dataclasses.replace(cfg, out=out.prepare()), classes, stats)
                try:
                    if table is None and not cfg.shuffle:
                        writer.expect(_count(source, shards) if cfg.shard_size is None and writer.sharded else 0)
                        _export_stream(source, shards, writer, stats, on_error, progress)
                    else:
                        if table is None:
                            table = _listing(source, shards, stats, on_error)
                        else:
                            table = valid_rows(table, stats, on_error, input_path)
                        writer.expect(table.num_rows)
                        _export_rows(source, table, writer, stats, cfg, on_error, progress)
                    writer.close()
                except BaseException as e:
                    writer.abort()
                    if isinstance(e, OSError) and not e.filename:  # disk full, EINVAL, ...: name the file
                        raise OSError(e.errno, e.strerror or str(e), writer.writing or cfg.out) from None
                    raise
                index = {
                    "format": cfg.to,
                    "samples": stats.samples,
                    "bytes": stats.bytes,
                    "files": writer.files,
                    "skipped": dict(stats.skipped),
                    "errors": stats.errors,
                    "shard_errors": stats.shard_errors,
                    "shards": {k: dict(v) for k, v in sorted(stats.per_shard.items())},
                    "renamed_keys": stats.renamed_keys,
                    "classes": classes,
                    "source": source.spec(),
                    "shuffle": cfg.shuffle,
                    "seed": cfg.seed if cfg.shuffle else None,
                    "shard_size": writer.max_shard_samples if writer.sharded else cfg.shard_size,
                    "shard_size_auto": cfg.shard_size is None,
                    "max_shard_bytes": cfg.max_shard_bytes,
                    **origin,
                }
                index.update(writer.index_fields())
                index["notes"] = _shard_note(writer, cfg) + writer.notes()
                out.publish(index)  # index.json (with the record of what was written) is the last name to appear
            except BaseException:
                out.abort()
                raise
    finally:
        source.close()
    index["seconds"] = {"read": round(stats.read_s, 3), "write": round(stats.write_s, 3), "total": round(time.perf_counter() - t0, 3)}
    check_complete(index, cfg.out, allow_missing)
    return index


def _shard_note(writer: Writer, cfg: ExportConfig) -> list[str]:
    """A note when a sharded export has fewer than 16 shards: a loader's extra workers get none."""
    n = len(writer.files)
    if not writer.sharded or not 0 < n < LOADER_SHARDS:
        return []
    why = "there are too few samples for more" if cfg.shard_size is None else f"--shard-size {cfg.shard_size}"
    return [f"wrote {n} shard{'s' if n > 1 else ''} ({why}): a DataLoader with more than {n} worker{'s' if n > 1 else ''} "
            "leaves the extra workers idle (each worker reads whole shards)"]


def _count(source: Source, shards) -> int:
    """Samples a whole dataset will export, for the default shard sizes: the listed files of an image
    folder, else the readable samples (a first pass; stops at COUNT_LIMIT, beyond which the shard
    size no longer depends on the count; damaged shards are reported by the export pass)."""
    if shards and all(sh.files for sh in shards):
        return sum(len(sh.files) for sh in shards)
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


def _export_stream(source: Source, shards, writer: Writer, stats: ExportStats, on_error: OnError, progress) -> None:
    """Whole dataset in source order: one sequential read of every shard."""
    folder = source.format == "folder"
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
                on_error.shard(e)
                stats.shard_error(shard.name, e)
                break
            finally:
                stats.read_s += time.perf_counter() - t
            per["seen"] += 1
            if not s.ok:
                on_error.sample(s)
                stats.skip(s.status, s.error, s.shard)
                continue
            _write(writer, stats, s.shard, s.key, s.label, s.members, s.loc_path if folder else None, progress, s.sample_id)


def _listing(source: Source, shards, stats: ExportStats, on_error: OnError) -> pa.Table:
    """Rows of every readable sample (for ``--shuffle`` of a whole dataset); problems counted here."""
    buf = RowBuffer()
    for shard in shards:
        try:
            for s in source.iter_samples(shard):
                if s.ok:
                    buf.add(s)
                else:
                    stats.shard(s.shard)["seen"] += 1
                    on_error.sample(s)
                    stats.skip(s.status, s.error, s.shard)
        except SourceError as e:
            on_error.shard(e)
            stats.shard_error(shard.name, e)
    return buf.table()


def output_order(table: pa.Table, shuffle: bool, seed: int) -> np.ndarray:
    """Row order of the export: source order (shard, file, offset), or a seeded shuffle by sample_id."""
    if shuffle:
        return np.argsort(mix64(table.column("sample_id").to_numpy(), seed), kind="stable")
    offsets = table.column("loc_offset").to_numpy()
    return np.lexsort((offsets, _string_ranks(table.column("loc_path")), _string_ranks(table.column("shard"))))


def _string_ranks(col) -> np.ndarray:
    """Per row, the rank of its (dictionary) string in sorted order: sorting strings via integers."""
    d = dict_column(col)
    values = d.dictionary
    rank = np.empty(len(values), np.int64)
    rank[pc.sort_indices(values).to_numpy()] = np.arange(len(values))
    return rank[d.indices.to_numpy(zero_copy_only=False)]


def _chunks(order: np.ndarray, sizes: np.ndarray, rows: int):
    """Slices of ``order`` of at most ``rows`` rows and CHUNK_BYTES bytes (at least one row)."""
    cum = np.cumsum(sizes[order]) if len(order) else np.zeros(0, np.int64)
    start = 0
    while start < len(order):
        base = cum[start - 1] if start else 0
        end = int(np.searchsorted(cum, base + CHUNK_BYTES, side="right"))
        end = min(max(end, start + 1), start + rows, len(order))
        yield order[start:end]
        start = end


def _export_rows(source: Source, table: pa.Table, writer: Writer, stats: ExportStats, cfg: ExportConfig, on_error: OnError,
                 progress) -> None:
    """Manifest rows (or a listing) in output order, in chunks; the writer's fast path takes what it can."""
    order = output_order(table, cfg.shuffle, cfg.seed)
    table = table.select(["shard", "key", "label", "loc_path", "loc_offset", "loc_size", "sample_id"])
    sizes = table.column("loc_size").to_numpy()
    fast = writer.fast_path(source, progress)  # it reads by location too: only inside the dataset (untrusted manifests)

    def slow(sub: pa.Table) -> None:
        for start in range(0, sub.num_rows, CHUNK):
            _slow_chunk(source, sub.slice(start, CHUNK), writer, stats, on_error, progress)

    try:
        for idx in _chunks(order, sizes, fast.chunk_rows if fast is not None else CHUNK):
            sub = table.take(pa.array(idx, pa.int64()))
            if fast is not None:
                fast.run(sub, slow)
            else:
                slow(sub)
    finally:
        if fast is not None:
            fast.close()


def _slow_chunk(source: Source, sub: pa.Table, writer: Writer, stats: ExportStats, on_error: OnError, progress) -> None:
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
        stats.shard(shard)["seen"] += 1
        if j in fetched:
            _write(writer, stats, shard, rows["key"][j], rows["label"][j], fetched[j], src_paths[j] if folder else None, progress,
                   rows["sample_id"][j])
        else:
            e = failed[j]
            stats.skip(e.reason, f"{e} (sample {rows['key'][j]!r} of {shard})", shard)
