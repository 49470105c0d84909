"""The streaming scoring loop.

shards ──► DataLoader workers (read + decode + resize, one shard at a time, batches never mix
shards) ──► device ──► metrics ──► one parquet part per shard (atomic, with a done-marker).

Workers rebuild the source from its small spec; the main process keeps only the in-flight shards'
metric values. A rerun skips shards whose done-marker verifies its part (rows, bytes, sha256) and
scores the others again; a rerun with different parameters stops unless ``--overwrite``; a second
run on the same OUT stops at once (``OUT/.dataprune.lock``, exit 9). Under ``torchrun`` each rank
scores ``shards[rank::world_size]``.
The loop never names a metric: it asks each metric's ``kind`` what to run and calls its ``compute``.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from typing import Any, Callable

import numpy as np

from ..config import ScoreConfig
from ..distributed import dist_info, rank_shards
from ..errors import DataPruneError, OutputLocked
from ..outlock import output_lock
from ..scoretable import read_table_meta, verify_parts, write_part, write_table_meta
from ..tables import PRED_LABEL, PRED_PROB, RowBuffer
from .batches import Normalizer, Timings, run_stream
from .planning import Plan, any_todo, check_out, check_out_location, finish_artifacts, init_out, plan
from .summary import Tally, reliability, work
from .text import CpuDevice


def _of_kind(p: Plan, *kinds: str) -> list:
    return [m for m in p.metrics if m.kind in kinds]


def _setup_device(cfg: ScoreConfig, world: int):
    import torch

    from ..models import resolve_device

    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    return device


def _models(p: Plan, device, emit, rank: int, world: int):
    """(models of the runs, init models, training statistics): one model per run — trained when a
    metric needs a trained proxy, else the given/pretrained one — and, for ``init`` metrics, one
    freshly initialised model per run."""
    import torch

    from ..models import ModelSpec, create_model
    from .training import train_runs

    cfg = p.cfg
    kinds = {m.kind for m in p.metrics}
    runs_models, train_stats = [], None
    if cfg.epochs > 0 and kinds & {"train", "eval", "embed"}:
        runs_models, train_stats = train_runs(p, device, emit, rank, world)
    elif "eval" in kinds:
        runs_models = [create_model(ModelSpec(cfg.model, p.num_classes, cfg.pretrained, cfg.checkpoint))]
    init_models = []
    if "init" in kinds:
        for r in range(cfg.runs):
            torch.manual_seed(cfg.seed + 1000 * r)
            # taken at initialisation: fresh (or --pretrained) weights, seeded per run, never --checkpoint
            init_models.append(create_model(ModelSpec(cfg.model, p.num_classes, cfg.pretrained, None)))
    for m in runs_models + init_models:
        m.to(device).eval()
        m.to(memory_format=torch.channels_last)  # faster on CPU (oneDNN) and GPU alike
    return runs_models, init_models, train_stats


class _Parts:
    """Writes one part per shard (range-checked, with its done-marker) and keeps the run's counts."""

    def __init__(self, p: Plan):
        self.p, self.multi = p, p.cfg.runs > 1
        self.all_need_labels = all(m.needs_labels for m in p.metrics)  # else unlabelled rows stay ok, label metrics NaN
        self.counts = {"seen": 0, "scored": 0, "skipped": 0}
        self.reasons: dict[str, int] = {}

    def write(self, sidx: int, base: dict, cols: dict, shard_error, unscored: dict | None = None) -> dict:
        from ..metrics import check_range

        nrows = len(base["sample_id"])
        if shard_error:
            self.reasons[shard_error[0]] = self.reasons.get(shard_error[0], 0) + 1
        if self.all_need_labels:  # no metric of this run can score a sample without a label
            for i, (st_, lbl) in enumerate(zip(base["status"], base["label"])):
                if st_ == "ok" and lbl is None:
                    base["status"][i] = "no_label"
                    base["error"][i] = f"{base['loc_path'][i]}: sample {base['key'][i]!r} has no label"
        self._not_finite(base, cols, unscored or {})
        for m in self.p.metrics:
            for c in m.score_columns:
                check_range(m.name, cols[c])
        buf = RowBuffer()
        buf.cols = base
        table = buf.table({k: _column(k, v) for k, v in cols.items() if not k.endswith("__runs")})
        bad = [s_ for s_ in base["status"] if s_ != "ok"]
        st = {"seen": nrows, "scored": nrows - len(bad), "skipped": len(bad), "shard_error": shard_error,
              "reasons": {s_: int(c) for s_, c in zip(*np.unique(bad, return_counts=True))} if bad else {}}
        for s_ in bad:
            self.reasons[s_] = self.reasons.get(s_, 0) + 1
        if self.multi:
            st["runs"] = {k[:-6]: v.tolist() for k, v in cols.items() if k.endswith("__runs")}
        write_part(self.p.cfg.out, sidx, table, st)
        for k in ("seen", "scored", "skipped"):
            self.counts[k] += st[k]
        return st

    def _not_finite(self, base: dict, cols: dict, unscored: dict) -> None:
        """A model whose output is NaN or inf (diverged training, a broken checkpoint, an overflow; any
        metric: softmax, losses, margins, gradient norms, training margins, embedding distances)
        scored nothing: the row gets status ``nan_score`` (counted, with file and member) and NaN
        where the value was not finite. Rows a metric cannot score (no label; ``unscored``: never
        presented in training) are NaN by design."""
        ok = np.array([st_ == "ok" for st_ in base["status"]], bool)
        labelled = np.array([lbl is not None for lbl in base["label"]], bool)
        for m in self.p.metrics:
            want = ok & labelled if m.needs_labels else ok
            for c in m.score_columns:
                v = cols[c]
                bad = want & ~np.isfinite(v)
                if c in unscored:
                    bad &= ~unscored[c]
                for i in np.flatnonzero(bad):
                    if base["status"][i] == "ok":
                        base["status"][i] = "nan_score"
                        base["error"][i] = f"{base['loc_path'][i]}: sample {base['key'][i]!r}: {c} is {v[i]}, not a finite score"
                v[bad] = np.nan


def _column(name: str, v: np.ndarray):
    """A metric column as Arrow: float32, or for the predicted class int32 with nulls where unscored."""
    import pyarrow as pa

    if name == PRED_LABEL:
        missing = np.isnan(v)
        return pa.array(np.where(missing, 0, v).astype(np.int32), mask=missing)
    return pa.array(v)


def _batch_values(p: Plan, device, runs_models, init_models, norm):
    """``compute(batch)`` for run_stream: every eval metric from each run's logits and every init
    metric from each init model, averaged over runs (with std and per-run values for --runs ≥ 2)."""
    import torch

    from ..metrics.outputs import eval_metrics

    cfg, cuda, multi = p.cfg, device.type == "cuda", p.cfg.runs > 1
    evals, inits = _of_kind(p, "eval"), _of_kind(p, "init")
    needs_labels = any(m.needs_labels for m in p.metrics)
    by_name = {m.name: m for m in evals + inits}

    def compute(batch) -> dict[str, np.ndarray]:
        labels = batch["labels"].to(device)
        valid = labels >= 0
        if needs_labels and not bool(valid.all()):
            labels = labels.clamp_min(0)
        x = norm(batch["images"])
        per_run: dict[str, list] = {m.name: [] for m in p.metrics if m.name in by_name}
        probs = []
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            for model in runs_models if evals else []:
                logits = model(x)
                for k, v in eval_metrics(logits, labels, evals).items():
                    per_run[k].append(v.float().cpu())
                probs.append(logits.float().softmax(1).cpu())
        for model in init_models:
            for m in inits:
                per_run[m.name].append(m.compute(model, x, labels, cfg).float().cpu())
        vals = {}
        for k, lst in per_run.items():
            stack = torch.stack(lst)
            masked = by_name[k].needs_labels and needs_labels
            vals[k] = (torch.where(valid.cpu(), stack.mean(0), torch.nan) if masked else stack.mean(0)).numpy()
            if multi:
                vals[k + "_std"] = (torch.where(valid.cpu(), stack.std(0), torch.nan) if masked else stack.std(0)).numpy()
                vals[k + "__runs"] = stack.T.numpy()
        if probs:  # the classifier's own answer, beside its scores: argmax of the run-averaged softmax
            prob, pred = torch.stack(probs).mean(0).max(1)
            vals[PRED_LABEL], vals[PRED_PROB] = pred.float().numpy(), prob.numpy()
        return vals

    return compute


def _assemble(p: Plan, rows: np.ndarray, vals: dict, nrows: int, train_stats, sidx: int) -> tuple[dict, dict]:
    """Per-shard metric columns (NaN for rows that were not scored), and per training metric the rows
    training never presented (NaN by design, not a model's non-finite output)."""
    multi = p.cfg.runs > 1
    cols: dict[str, np.ndarray] = {}
    unscored: dict[str, np.ndarray] = {}
    for k, v in vals.items():
        arr = np.full((nrows,) + v.shape[1:], np.nan, np.float32)
        arr[rows] = v
        cols[k] = arr
    if train_stats is not None:
        ok = np.zeros(nrows, bool)
        ok[rows] = True
        for m in _of_kind(p, "train"):
            mean, std, per_run = train_stats.values(m, sidx, nrows)
            cols[m.name] = np.where(ok, mean, np.nan).astype(np.float32)
            unscored[m.name] = ~train_stats.presented(sidx, nrows)
            if multi:
                cols[m.name + "_std"] = np.where(ok, std, np.nan).astype(np.float32)
                cols[m.name + "__runs"] = np.where(ok[:, None], per_run, np.nan).astype(np.float32)
    for m in p.metrics:
        if m.kind != "embed":
            cols.setdefault(m.name, np.full(nrows, np.nan, np.float32))
    return cols, unscored


def score(cfg: ScoreConfig, *, on_event: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Run ``dataprune score``. ``on_event(kind, info)`` receives progress events."""
    emit = on_event or (lambda kind, info: None)
    t_start = time.perf_counter()
    rank, world = dist_info()
    p = plan(cfg)
    device = _setup_device(p.cfg, world) if world > 1 or not _of_kind(p, "text") else CpuDevice()  # text: no torch
    check_out_location(p)
    with _one_writer(p.cfg.out, rank, world):
        return _score(p, device, emit, rank, world, t_start)


@contextmanager
def _one_writer(out: str, rank: int, world: int):
    """Hold OUT's lock for the whole run, so a second run on the same table stops at once (exit 9)
    instead of interleaving parts and metadata. Under torchrun the ranks of one job are one writer
    (disjoint parts, rank 0 alone writes the metadata): rank 0 takes the lock — an exclusive flock
    per rank would shut out its own job, a shared one would let a second job in — and broadcasts
    the outcome before any rank writes, so a refused job stops on every rank."""
    with ExitStack() as stack:
        failure = None
        if rank == 0:
            try:
                stack.enter_context(output_lock(out, "score"))
            except (DataPruneError, OSError) as e:
                failure = e
        if world > 1:
            import torch.distributed as dist

            box = [None if failure is None else str(failure)]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None and failure is None:
                failure = OutputLocked(box[0])
        if failure is not None:
            raise failure
        yield


def _score(p: Plan, device, emit, rank: int, world: int, t_start: float) -> dict[str, Any]:
    cfg = p.cfg  # defaults resolved
    same = check_out(p)
    if rank == 0:
        init_out(p, same)
    if world > 1:
        import torch.distributed

        torch.distributed.barrier()
    finished, damaged = verify_parts(cfg.out, [s.index for s in rank_shards(p.shards, rank, world)])
    notes = [f"{why}: scored again" for why in damaged.values()]
    for idx, why in damaged.items():
        emit("rescore", {"index": idx, "reason": why})
    names = [m.name for m in p.metrics]
    mine = rank_shards(p.shards, rank, world)
    todo = [s for s in mine if s.index not in finished]
    emit = tally = Tally(emit)
    emit("plan", {"shards": len(p.shards), "todo": len(todo), "done": len(finished), "image_size": p.image_size,
                  "device": str(device), "metrics": names, "rank": rank, "world": world, "work": work(p, mine, todo)})
    t0 = time.perf_counter()
    left = any_todo(len(todo), device, world)  # a complete table: no training, no embedding (checkpoints may be gone)
    runs_models, init_models, train_stats = _models(p, device, emit, rank, world) if left and not _of_kind(p, "text") else ([], [], None)
    secs = {"train": time.perf_counter() - t0 if train_stats is not None else 0.0, "embed": 0.0, "global": 0.0, "score": 0.0}
    embed = None
    if _of_kind(p, "embed") and left:
        from .embedding import run_embedding

        t0 = time.perf_counter()
        embed = run_embedding(p, device, emit, runs_models, None, rank, world)
        secs["global"] = float(embed.info.get("seconds", 0.0))
        secs["embed"] = max(0.0, time.perf_counter() - t0 - secs["global"])
        notes += embed.info.get("notes", [])
    elif _of_kind(p, "text") and left:  # metrics that need no model: documents → arrays per shard → global step
        from .text import run_text

        embed = run_text(p, emit, rank, world)  # a cache the parts are written from, as the embedding one
        secs["embed"], secs["global"] = embed.info["read_seconds"], embed.info["seconds"]
    t_score = time.perf_counter()
    emit("score_start", {"shards": len(todo)})
    parts, t = _Parts(p), Timings()

    def done(sidx: int, st: dict) -> None:
        emit("shard", {"index": sidx, **st, "timings": asdict(t), "elapsed": time.perf_counter() - t_start})

    if embed is not None and not (_of_kind(p, "eval") or init_models or train_stats):
        # every metric comes from the embedding cache: write the parts from it, no second read of the data
        for shard in todo:
            t0 = time.perf_counter()
            base = embed.base(shard.index)
            st = parts.write(shard.index, base, embed.columns(shard.index, len(base["sample_id"])), embed.shard_error(shard.index))
            t.write += time.perf_counter() - t0
            done(shard.index, st)
    elif todo:
        def finish(sidx: int, base: dict, rows: np.ndarray, vals: dict, shard_error) -> None:
            nrows = len(base["sample_id"])
            cols, unscored = _assemble(p, rows, vals, nrows, train_stats, sidx)
            if embed is not None:
                cols.update(embed.columns(sidx, nrows))
            done(sidx, parts.write(sidx, base, cols, shard_error, unscored))

        values = _batch_values(p, device, runs_models, init_models, Normalizer(p.mean, p.std, device, True))

        def compute(batch) -> dict[str, np.ndarray]:
            vals = values(batch)
            emit("score_batch", {"samples": len(batch["rows"])})
            return vals

        run_stream(p.stream(cuda=device.type == "cuda"), todo, compute, finish, t)
    secs["score"] = time.perf_counter() - t_score
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    result = {"out": cfg.out, "metrics": names, **parts.counts, "reasons": parts.reasons, "timings": asdict(t),
              "seconds": round(time.perf_counter() - t_start, 3), "shards_done_before": len(finished), "image_size": p.image_size,
              "device": str(device), "rescored": {str(k): v for k, v in damaged.items()}, "notes": notes,
              **tally.result(cfg, parts.counts["seen"], secs, train_stats is not None)}
    if _of_kind(p, "text") and embed is not None:
        result["text"] = embed.info  # documents, bands × rows, pairs checked and kept, groups
    # every part is written: the checkpoints go (unless keep_artifacts); what stays beside the table, {path, kind, bytes}
    result["artifacts"], result["artifacts_removed"] = finish_artifacts(cfg, bool(_of_kind(p, "embed"))) if rank == 0 else ([], [])
    if cfg.runs > 1 and rank == 0:
        result["reliability"] = reliability(cfg.out, names)
        meta = read_table_meta(cfg.out)
        meta["reliability"] = result["reliability"]
        write_table_meta(cfg.out, meta)
    return result
