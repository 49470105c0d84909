"""The export driver: read a manifest (or a whole dataset), put the rows in output order, hand the
samples to the writer ``--to`` names, publish the result with ``index.json`` last.

It knows writers only through :mod:`.base` (the registry and the :class:`~.base.Writer` hooks),
never a concrete writer. The whole run holds the output lock; the writer builds the export in a
staging directory inside ``--out`` that :mod:`.outdir` publishes when it is complete, so an
interrupted export (exception, Ctrl-C, SIGTERM or SIGKILL) never leaves a directory that looks
finished, and an earlier export's files are removed only when its record proves they are ours.

With ``--jobs N`` or under torchrun (:mod:`.parallel`) a writer that can (``Writer.parallel``)
is run by every member on the output parts ``≡ k (mod N)``; the leader adopts their files and
publishes. Each row's part comes from its position alone (:mod:`.rows`), so the output — every
file, ``index.json`` included — is the same bytes for any N.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import numpy as np
import pyarrow.parquet as pq

from ..config import LOADER_SHARDS, ExportConfig
from ..distributed import dist_info
from ..errors import OnError
from ..manifest import check_complete
from ..outlock import output_lock
from ..sources import open_source
from ..tables import LOCATION_COLUMNS, as_numpy, is_manifest, read_manifest
from .base import ExportStats, Writer, writer_class
from .checks import check_classes, manifest_source, valid_rows
from .outdir import OutDir
from .parallel import Jobs, Ranks, Team, auto_jobs, team
from .rows import count, export_rows, export_stream, listing, listing_count, output_order

ROWS_FILE = ".dataprune-rows.parquet"  # in the stage: a whole dataset's listing, for the other torchrun ranks


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
    index's ``notes`` (one line each) say e.g. that fewer than 16 shards were written.

    ``cfg.jobs`` > 1 (or torchrun's ranks) write the parts side by side; writers that cannot
    (``Writer.parallel`` False: folder, list) are run by one process, and the result's ``notes`` say so."""
    writer_cls = writer_class(cfg.to)  # --to is checked by the registry, before anything is written
    cfg.validate()
    rank, world = dist_info()
    t0 = time.perf_counter()
    jobs = cfg.jobs if writer_cls.parallel else 1
    auto = jobs == 0 and world == 1  # --jobs auto: decided once the manifest is read (under torchrun: the ranks)
    tm = team(max(jobs, 1), rank, world, cfg.timeout)
    job = None
    try:
        job = _Job(input_path, cfg, writer_cls, format, source_options, progress, overwrite, tm, auto)
        index = job.lead() if tm.leader else job.follow()
    finally:
        (job.tm if job is not None else tm).close()
    index = dict(index)
    index["seconds"] = {"read": round(job.stats.read_s, 3), "write": round(job.stats.write_s, 3),
                        "total": round(time.perf_counter() - t0, 3)}
    index["processes"] = job.tm.size  # (like the seconds, not part of index.json: the output is the same for any number)
    if (cfg.jobs > 1 or world > 1) and not writer_cls.parallel:  # the result only: index.json is the same for any N
        index["notes"] = [*index["notes"], f"the {cfg.to!r} writer runs in one process (each file name depends on every "
                          f"earlier sample); {'--jobs' if world == 1 else 'the torchrun ranks'} did not split it"]
    check_complete(index, cfg.out, allow_missing)
    return index


class _Job:
    """One process's view of one export (leader or follower, see :mod:`.parallel`)."""

    def __init__(self, input_path, cfg: ExportConfig, writer_cls: type[Writer], format, source_options, progress, overwrite, tm: Team,
                 auto: bool = False):
        self.input_path, self.cfg, self.writer_cls, self.progress, self.overwrite, self.tm = \
            input_path, cfg, writer_cls, progress, overwrite, tm
        self.auto = auto
        self.format, self.source_options = format, source_options
        self.on_error = OnError(cfg.on_error)
        self.stats = ExportStats()
        self.parts = writer_cls.parallel and tm.size > 1  # the members write parts (steps A and B of parallel)

    def _open(self) -> None:
        if is_manifest(self.input_path):
            self.table, meta = read_manifest(self.input_path, LOCATION_COLUMNS)
            self.source, self.classes = manifest_source(self.input_path, meta)
            self.origin, self.shards = {"manifest": os.path.abspath(self.input_path)}, None
        else:
            self.source = open_source(self.input_path, self.format, **(self.source_options or {}))
            self.shards = self.source.list_shards()
            self.table, self.classes = None, self.source.classes
            check_classes(self.classes, f"{self.input_path}: class name")
            self.origin = {"dataset": self.input_path}

    def _rows(self, stats: ExportStats) -> tuple[Any, np.ndarray, int]:
        """The rows to write, their order and the count the shard plan is made for."""
        cfg = self.cfg
        if self.table is None:
            table = listing(self.source, self.shards, stats, self.on_error)
            return table, self._listing_order(table), table.num_rows if cfg.shuffle else listing_count(self.shards, table)
        table = valid_rows(self.table, stats, self.on_error, self.input_path)
        return table, output_order(table, cfg.shuffle, cfg.seed), table.num_rows

    def _listing_order(self, table) -> np.ndarray:
        """The order of a whole dataset's listing (leader and followers alike: parts depend on it)."""
        return output_order(table, True, self.cfg.seed) if self.cfg.shuffle else np.arange(table.num_rows)

    def _work(self, scfg: ExportConfig, table, order, n: int):
        """What each member runs: its parts, into files under temporary names (``Writer.finish``)."""

        def work(k: int, size: int, progress) -> tuple[list, ExportStats]:
            stats = ExportStats()
            writer = self.writer_cls(scfg, self.classes, stats)
            writer.expect(n)
            try:
                export_rows(self.source, table, order, scfg.shard_plan(n), writer, stats, self.on_error, progress, k, size)
                writer.finish()
            except BaseException as e:
                writer.abort()
                raise _named(e, writer, scfg)
            return writer.files, stats

        return work

    def lead(self) -> dict[str, Any]:
        cfg, stats, tm = self.cfg, self.stats, self.tm
        pending = "A" if self.parts else "C"  # the next step the other ranks wait at (parallel.Ranks)
        self._open()
        try:
            try:
                if self.table is not None:
                    locs = [p for p in self.table.column("loc_path").unique().to_pylist() if isinstance(p, str)] if self.table.num_rows else []
                    self.source.refuse_output_inside(cfg.out, locs)
                else:
                    self.source.refuse_output_inside(cfg.out, [s.path for s in self.shards])
                with output_lock(cfg.out, "export"):
                    out = OutDir(cfg.out, self.writer_cls, cfg.prefix, self.overwrite)
                    try:
                        scfg = dataclasses.replace(cfg, out=out.prepare())
                        rows = None
                        if self.auto and self.table is not None:  # --jobs auto: decided on the rows to export
                            rows = self._rows(stats)
                            tm = self._auto_team(rows[0])
                        if self.parts:
                            table, order, n = rows or self._rows(stats)
                            rows_file = None
                            if self.table is None and isinstance(tm, Ranks):  # forked --jobs workers have it in memory
                                rows_file = os.path.join(scfg.out, ROWS_FILE)
                                pq.write_table(table, rows_file)
                            tm.share({"stage": scfg.out, "rows": rows_file, "n": n})
                            pending = "B"
                            results = tm.parts(self._work(scfg, table, order, n), self.progress)
                            pending = "C"
                            if rows_file:
                                os.unlink(rows_file)
                            writer = self._adopt(scfg, results, n)
                        else:
                            writer = self._serial(scfg, rows)
                        index = self._index(writer)
                        out.publish(index)  # index.json (with the record of what was written) is the last name to appear
                    except BaseException:
                        out.abort()
                        raise
            finally:
                self.source.close()
        except BaseException as e:
            if pending != "B" and isinstance(e, Exception):
                tm.share(error=e)  # the other ranks wait at this step: they stop with the same error
            raise
        tm.share(index)
        return index

    def follow(self) -> dict[str, Any]:
        """A torchrun rank other than 0: its parts, then rank 0's index (or the error every rank ends with)."""
        if not self.parts:
            return self.tm.share()
        info = self.tm.share()
        scfg = dataclasses.replace(self.cfg, out=info["stage"])
        failed: BaseException | None = None
        try:
            self._open()
            if info["rows"] is not None:
                table = pq.read_table(info["rows"])
                order = self._listing_order(table)
                n = info["n"]
            else:
                table, order, n = self._rows(ExportStats())  # the leader counts what is skipped here
        except Exception as e:  # noqa: BLE001 - reported at the parts step, to every rank
            failed = e

        def mine(k, size, progress):
            if failed is not None:
                raise failed
            return self._work(scfg, table, order, n)(k, size, progress)

        try:
            self.tm.parts(mine, self.progress)
        finally:
            if failed is None:
                self.source.close()
        return self.tm.share()

    def _auto_team(self, t) -> Team:
        """``--jobs auto`` for a manifest's rows to export ``t`` (``checks.valid_rows``: sizes within
        bounds): forked workers when their bytes call for more than one (``parallel.auto_jobs``; a
        whole dataset's export, not listed up front, stays in one process)."""
        n = t.num_rows
        nbytes = int(as_numpy(t.column("loc_size"), fill=0).sum(dtype=np.float64)) if n else 0  # (float: cannot wrap)
        q, _ = self.cfg.shard_plan(n)
        k = auto_jobs(nbytes, -(-n // max(q, 1)))
        if k > 1:
            self.tm, self.parts = Jobs(k, self.cfg.timeout), True
        return self.tm

    def _serial(self, scfg: ExportConfig, rows: tuple | None = None) -> Writer:
        """One process writes everything (as it always did with one process); ``rows``: ``_rows()``, if taken."""
        cfg, stats = self.cfg, self.stats
        writer = self.writer_cls(scfg, self.classes, stats)
        try:
            if self.table is None and not cfg.shuffle:
                writer.expect(count(self.source, self.shards) if cfg.shard_size is None and writer.sharded else 0)
                export_stream(self.source, self.shards, writer, stats, self.on_error, self.progress, writer.plan)
            else:
                table, order, n = rows or self._rows(stats)
                writer.expect(n)
                export_rows(self.source, table, order, writer.plan, writer, stats, self.on_error, self.progress)
            writer.close()
        except BaseException as e:
            writer.abort()
            raise _named(e, writer, scfg)
        return writer

    def _adopt(self, scfg: ExportConfig, results: list, n: int) -> Writer:
        """The leader takes every member's files and counts, then names the files (``Writer.close``)."""
        writer = self.writer_cls(scfg, self.classes, self.stats)
        writer.expect(n)
        files = []
        for got, stats in results:
            files += got
            self.stats.merge(stats)
        try:
            writer.adopt(files)
            writer.close()
        except BaseException as e:
            writer.abort()
            raise _named(e, writer, scfg)
        return writer

    def _index(self, writer: Writer) -> dict[str, Any]:
        cfg, stats = self.cfg, self.stats
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
            "classes": self.classes,
            "source": self.source.spec(),
            "shuffle": cfg.shuffle,
            "seed": cfg.seed if cfg.shuffle else None,
            "shard_size": writer.max_shard_samples if writer.sharded else cfg.shard_size,
            "shard_size_auto": cfg.shard_size is None,
            "max_shard_bytes": cfg.max_shard_bytes,
            **self.origin,
        }
        index.update(writer.index_fields())
        index["notes"] = _shard_note(writer, cfg) + writer.notes()
        return index


def _named(e: BaseException, writer: Writer, cfg: ExportConfig) -> BaseException:
    """An OS error without a file name (disk full, EINVAL, ...) names the file being written."""
    if isinstance(e, OSError) and not e.filename:
        return OSError(e.errno, e.strerror or str(e), writer.writing or cfg.out)
    return e


def _shard_note(writer: Writer, cfg: ExportConfig) -> list[str]:
    """A note when a sharded export has fewer than 16 shards: a loader's extra workers get none."""
    n = len(writer.files)
    if not writer.sharded or not 0 < n < LOADER_SHARDS:
        return []
    why = "there are too few samples for more" if cfg.shard_size is None else f"--shard-size {cfg.shard_size}"
    return [f"wrote {n} shard{'s' if n > 1 else ''} ({why}): a DataLoader with more than {n} worker{'s' if n > 1 else ''} "
            "leaves the extra workers idle (each worker reads whole shards)"]
