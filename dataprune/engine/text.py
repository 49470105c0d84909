"""The text pass: metrics that need no model (``kind="text"``: text-dedup, text-substr).

1. **Per shard**, in a pool of ``--workers`` spawned processes (or the main process with ``--workers
   0``; torch is not imported for a text run outside torchrun): read the
   shard's samples, take each one's document (:func:`dataprune.sources.text_of`; a sample without one
   is a counted skip), run every text metric's ``shard(docs, cfg)`` and save its arrays, with the
   shard's base rows, in ``OUT/.text/<fingerprint>/`` (the base rows last: their presence is the
   shard's done-marker, so an interrupted run resumes). Nothing of a shard stays in memory.
2. **Globally**, once every shard is there: each metric's ``combine`` sees every shard's arrays
   through a :class:`TextSet` (memory-mapped, concatenated in shard order — the global row of a
   document is its place in that order on every rank) and returns one value per document.
3. The engine writes the parts from the base rows and those columns (:meth:`TextResult.columns`).

Under torchrun each rank reads ``shards[rank::world]``; ``combine`` runs on every rank (text-dedup
shares its bands out), rank 0 returns the columns and hands them to the others through
``.text/.../global.npz`` and a marker written last (polled, as the embedding hand-over).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..distributed import rank_shards
from ..errors import DataPruneError, OnError, SourceError, check_stop
from ..tables import RowBuffer, atomic_path, atomic_write_json, write_parquet_atomic
from .batches import _reraise
from .outdir import PassResult
from .planning import text_root


def _base(work: str, sidx: int) -> str:
    return os.path.join(work, f"base-{sidx:06d}.parquet")


def _array(work: str, metric: str, name: str, sidx: int) -> str:
    return os.path.join(work, f"{metric}.{name}-{sidx:06d}.npy")


class CpuDevice:
    """What a text run reports as its device: it builds no model, so torch is never imported (unless
    torchrun's process group needs it)."""

    type = "cpu"

    def __str__(self) -> str:
        return "cpu"


def _shard_job(job: tuple) -> dict:
    """One shard: documents → every text metric's arrays, saved with the base rows (a pool task, or
    called in the main process). Errors come back as a record (raised again in the main process)."""
    try:
        return _one_shard(*job)
    except DataPruneError as e:
        return {"fatal": (type(e).__name__, str(e), getattr(e, "reason", None))}


def _one_shard(source_spec: dict, shard, metrics: list[str], cfg, work: str, column: str) -> dict:
    from ..metrics import get_metric
    from ..sources import source_from_spec, text_of

    source, policy = source_from_spec(source_spec), OnError(cfg.on_error)
    t0 = time.perf_counter()
    base, docs, rows, shard_error = RowBuffer(), [], [], None
    try:
        for s in source.iter_samples(shard):
            text, why, msg = text_of(s, column)
            if text is None:
                s.status, s.error = why, msg
                policy.sample(s)
            else:
                s.status, s.error = "ok", None
                rows.append(len(base))
                docs.append(text)
            base.add(s)
    except SourceError as e:
        policy.shard(e)
        shard_error = (e.reason, str(e))
    for name in metrics:
        for k, v in get_metric(name).compute.shard(docs, cfg).items():
            with atomic_path(_array(work, name, k, shard.index)) as tmp, open(tmp, "wb") as f:
                np.save(f, v)
    doc_row = np.full(len(base), -1, np.int64)
    doc_row[rows] = np.arange(len(rows))
    table = base.table({"doc_row": pa.array(doc_row)})
    write_parquet_atomic(table, _base(work, shard.index), {"shard_error": shard_error})  # last: the shard is done
    return {"shard": shard.index, "rows": len(base), "docs": len(rows), "seconds": time.perf_counter() - t0}


def _leave_signals_to_the_main_process() -> None:
    """Ctrl-C and SIGTERM stop the run in the main process, which ends the pool (no worker tracebacks)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_shards(jobs: list[tuple], workers: int):
    """The records of every job, in order: in the main process, or in a pool of ``workers`` spawned
    processes (one shard a task; a spawned worker imports no torch)."""
    if workers <= 0:
        for job in jobs:
            check_stop()
            yield _shard_job(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # (not multiprocessing.Pool: it replaces a killed worker and waits for the lost shard forever)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_leave_signals_to_the_main_process) as pool:
        try:
            for rec in pool.map(_shard_job, jobs):
                check_stop()
                yield rec
        except BrokenProcessPool:
            raise DataPruneError("a text worker process died (killed from outside, e.g. out of memory); the shards "
                                 "already done are kept and a rerun resumes (fewer --workers use less memory)") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


class TextSet:
    """Every shard's arrays of the text metrics, for ``combine``: documents in global row order."""

    def __init__(self, work: str, shards: list, cfg, emit, rank: int, world: int):
        self.work, self.shards, self.cfg, self.emit, self.rank, self.world = work, shards, cfg, emit, rank, world
        rows = [pq.read_table(_base(work, s.index), columns=["doc_row", "sample_id"]) for s in shards]
        keep = [t.column("doc_row").to_numpy() >= 0 for t in rows]
        self.counts = [int(k.sum()) for k in keep]
        self.n = int(sum(self.counts))
        self.ids = np.concatenate([t.column("sample_id").to_numpy()[k] for t, k in zip(rows, keep)]) if rows else np.zeros(0, np.uint64)
        self.info: dict[str, Any] = {"documents": self.n}

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def array(self, metric: str, name: str) -> np.ndarray:
        """The per-shard arrays ``name`` of ``metric`` joined along their first axis (a memory map)."""
        out = self.path(f"all-{metric}.{name}.npy")
        if not os.path.exists(out):
            parts = [np.load(_array(self.work, metric, name, s.index), mmap_mode="r") for s in self.shards]
            shape = (sum(p.shape[0] for p in parts),) + parts[0].shape[1:]
            with atomic_path(out) as tmp:
                m = np.lib.format.open_memmap(tmp, mode="w+", dtype=parts[0].dtype, shape=shape)
                at = 0
                for p in parts:
                    m[at: at + p.shape[0]] = p
                    at += p.shape[0]
                m.flush()
                del m
        return np.load(out, mmap_mode="r")

    def band(self, metric: str, name: str, j: int) -> np.ndarray:
        """Row ``j`` of each shard's band-major ``(bands, n)`` array, joined: one band of every document."""
        return np.concatenate([np.load(_array(self.work, metric, name, s.index), mmap_mode="r")[j] for s in self.shards])

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


@dataclass
class TextResult(PassResult):
    work: str
    offsets: dict[int, int]  # shard index → its first document's global row
    columns_all: dict[str, np.ndarray]
    info: dict[str, Any]

    ROW = "doc_row"
    ROOT = "work"
    WHAT = "text arrays"


def _done(work: str, sidx: int) -> bool:
    if not os.path.exists(_base(work, sidx)):
        return False
    try:
        pq.read_schema(_base(work, sidx))
    except (OSError, pa.ArrowException):
        os.unlink(_base(work, sidx))
        return False
    return True


def run_text(p, emit, rank: int = 0, world: int = 1) -> TextResult:
    """Every text metric of the plan over every shard (this rank's shards read here), then globally."""
    from ..metrics import in_registry_order
    from ..sources.text import DEFAULT_TEXT_COLUMN

    cfg = p.cfg
    metrics = [m.name for m in in_registry_order(m for m in p.metrics if m.kind == "text")]
    work = text_root(cfg, p.meta)
    os.makedirs(work, exist_ok=True)
    todo = [s for s in rank_shards(p.shards, rank, world) if not _done(work, s.index)]
    emit("text", {"shards": len(p.shards), "todo": len(todo)})
    t0 = time.perf_counter()
    column = p.source.options.get("text_column") or DEFAULT_TEXT_COLUMN
    jobs = [(p.source.spec(), s, metrics, cfg, work, column) for s in todo]
    for rec in _run_shards(jobs, min(cfg.workers, len(todo))):
        if "fatal" in rec:
            _reraise(rec["fatal"])
        emit("text_shard", rec)
    read_s = time.perf_counter() - t0
    if rank == 0:  # joined arrays and a hand-over an interrupted run left: made again from the shards' files
        for f in os.listdir(work):
            if f.startswith("all-") or f.startswith("global.") or f.startswith("text-dedup-pairs-"):
                os.unlink(os.path.join(work, f))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every shard's arrays are in the work directory
    ts = TextSet(work, p.shards, cfg, emit, rank, world)
    t0 = time.perf_counter()
    cols: dict[str, np.ndarray] | None = {}
    for name in metrics:
        from ..metrics import get_metric

        got = get_metric(name).compute.combine(ts)
        if got is not None and cols is not None:
            cols.update(got)
    offsets = dict(zip([s.index for s in p.shards], np.concatenate([[0], np.cumsum(ts.counts)[:-1]]).astype(int).tolist()))
    info = {**ts.info, "seconds": round(time.perf_counter() - t0, 3), "read_seconds": round(read_s, 3)}
    if world > 1:
        cols, info = _hand_over(work, cols if rank == 0 else None, info, rank)
    emit("text_done", info)
    return TextResult(work, offsets, cols, info)


def _hand_over(work: str, cols, info: dict, rank: int):
    """torchrun: rank 0's columns to every rank through a file and a marker written last (polled)."""
    import torch.distributed as dist

    data, marker = os.path.join(work, "global.npz"), os.path.join(work, "global.json")
    if rank == 0:
        with atomic_path(data) as tmp, open(tmp, "wb") as f:
            np.savez(f, **cols)
        atomic_write_json(marker, info)
    else:
        while not os.path.exists(marker):
            check_stop()
            time.sleep(0.2)
        with np.load(data) as z:
            cols = {k: z[k] for k in z.files}
        with open(marker) as f:
            info = json.load(f)
    dist.barrier()  # every rank has read it
    if rank == 0:
        for f in (data, marker):
            os.unlink(f)
    return cols, info
