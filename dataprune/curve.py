"""`dataprune curve`: the pruning curve on your own data.

For every strategy (keep hard / easy / random, CCS) and kept fraction, select with ``select.py``,
train the same model from scratch on the kept rows, and evaluate on a test set. By default every
fraction gets the same number of optimisation steps (epochs / fraction, as the CCS paper does);
``--same-epochs`` keeps the epoch count instead. Each (strategy, fraction, repeat) is one resumable
unit: its result is a small JSON file under ``OUT/runs/`` and its training checkpoints every epoch.
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .config import CurveConfig, ScoreConfig, default
from .errors import ConfigError, TableError
from .outlock import output_lock
from .scoretable import read_json
from .tables import as_numpy, atomic_path, atomic_write_json

def _load_scores(path: str, by: str | None):
    """Per-row arrays of a score table, with each row's (shard index, row in shard). The table is read
    as `select` reads it (``select.inputs``): metadata, markers and column types are checked."""
    from .select.inputs import open_input

    if not os.path.isdir(path):
        raise ConfigError(f"--scores {path}: not a score table directory")
    inp = open_input(path)
    meta = inp.meta
    metrics = [c for c, info in inp.metrics.items() if "range" in info]
    if by is None:
        if len(metrics) != 1:
            raise ConfigError(f"{path} has metrics {', '.join(metrics)}: choose one with --by")
        by = metrics[0]
    elif by not in metrics:
        raise ConfigError(f"--by {by}: not in {path} (has {', '.join(metrics)})")
    ids, score, labels, shard, row = [], [], [], [], []
    for i, t in zip(inp.parts, inp.pieces(["sample_id", "status", "label", by])):
        sc = as_numpy(pc.cast(t.column(by), pa.float64()), fill=np.nan)
        ok = np.asarray(pc.fill_null(pc.equal(t.column("status").cast(pa.string()), "ok"), False)) & np.isfinite(sc)
        ids.append(as_numpy(t.column("sample_id"))[ok])
        score.append(sc[ok])
        labels.append(as_numpy(t.column("label"), fill=-1).astype(np.int64)[ok])
        shard.append(np.full(int(ok.sum()), i, np.int64))
        row.append(np.arange(t.num_rows)[ok])
    if not ids:
        raise TableError(f"{path}: the score table has no finished parts")
    return by, meta, *(np.concatenate(a) for a in (ids, score, labels, shard, row))


def _masks(keep: np.ndarray, shard: np.ndarray, row: np.ndarray) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for s in np.unique(shard):
        sel = shard == s
        m = np.zeros(int(row[sel].max()) + 1, bool)
        m[row[sel][keep[sel]]] = True
        out[int(s)] = m
    return out


def evaluate(model, test_plan, device) -> tuple[int, int]:
    """(correct, total) of ``model`` on every labelled, decodable test sample."""
    import torch

    from .engine.batches import Normalizer, Timings, run_stream

    norm = Normalizer(test_plan.mean, test_plan.std, device, True)
    tally = [0, 0]

    def compute(batch):
        y = batch["labels"].to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(norm(batch["images"])).float().argmax(1)
        ok = y >= 0
        tally[0] += int((pred[ok] == y[ok]).sum())
        tally[1] += int(ok.sum())
        return {}

    run_stream(test_plan.stream(cuda=device.type == "cuda"), test_plan.shards, compute, lambda *a: None, Timings())
    return tally[0], tally[1]


def run_curve(cfg: CurveConfig, emit: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    from .engine import plan
    from .select import check_keeps

    cfg.validate()
    check_keeps(cfg.keeps)
    base = ScoreConfig(data=cfg.train, metrics=("loss",), out=cfg.out, epochs=cfg.epochs, **cfg.score)
    p = plan(base)  # the training options are checked here, before anything is written
    test_plan = plan(replace(base, data=cfg.test, format=None, source_options={}, epochs=1))
    if test_plan.num_classes != p.num_classes:
        raise ConfigError(f"--test has {test_plan.num_classes} classes, TRAIN has {p.num_classes}")
    with output_lock(cfg.out, "curve"):  # one writer per --out: a second curve there stops at once (exit 9)
        return _run_curve(cfg, emit or (lambda k, i: None), p, replace(test_plan, image_size=p.image_size))


def _run_curve(cfg: CurveConfig, emit: Callable[[str, dict], None], p, test_plan) -> dict[str, Any]:
    from .engine.training import train_model
    from .models import resolve_device
    from .select import config_for, get_strategy, plan_selection

    by, meta, ids, score, labels, shard, row = _load_scores(cfg.scores, cfg.by)
    if meta.get("shard_fingerprint") != p.meta["shard_fingerprint"] or set(int(s) for s in np.unique(shard)) - {s.index for s in p.shards}:
        raise ConfigError(f"{cfg.scores} was not made from {cfg.train} (its shards do not match)")
    device = resolve_device(p.cfg.device)
    runs_dir = os.path.join(cfg.out, "runs")
    _check_settings(cfg, by, meta)
    os.makedirs(runs_dir, exist_ok=True)
    todo = [(k, f, r) for k in cfg.keeps for f in cfg.fracs for r in range(cfg.repeats)]
    left = [(f, r) for k, f, r in todo if _finished_unit(os.path.join(runs_dir, f"{k}-{f:.4f}-{r}.json")) is None]
    emit("curve_plan", {"runs": len(todo), "metric": by, "candidates": int(len(ids)),  # units: the progress display's totals
                        "units": [{"epochs": cfg.train_epochs(f), "kept": round(f * len(ids))} for f, r in left]})
    results = []
    for k, f, r in todo:
        name = f"{k}-{f:.4f}-{r}"
        path = os.path.join(runs_dir, name + ".json")
        done = _finished_unit(path)
        if done is not None:
            results.append(done)
            continue
        full = [d for d in results if d["fraction"] == 1.0 and d["repeat"] == r]
        if f == 1.0 and full:  # every strategy keeps everything at 1.0: one training serves them all
            res = dict(full[0], strategy=k)
            atomic_write_json(path, res)
            results.append(res)
            emit("curve_run", res)
            continue
        seed = p.cfg.seed + 7919 * r
        # a strategy that drops the hardest β first (CCS) runs at --ccs-beta, capped at low pruning rates so the budget fits
        beta = {"ccs_beta": min(cfg.ccs_beta, round(1.0 - f, 6))} if get_strategy(k).beta == "ccs_beta" else {}
        sel = config_for(k, by=(by,), frac=f, class_balanced=cfg.class_balanced, seed=seed, **beta)
        sel.validate()
        chosen = plan_selection(sel, ids, score, labels).keep
        ep = cfg.train_epochs(f)
        t0 = time.perf_counter()
        model = train_model(p, device, emit, seed=seed, epochs=ep, ckpt=os.path.join(runs_dir, name + ".pt"),
                            keep=_masks(chosen, shard, row))
        train_s = time.perf_counter() - t0
        correct, total = evaluate(model, test_plan, device)
        res = {"strategy": k, "fraction": f, "repeat": r, "kept": int(chosen.sum()), "epochs": ep, "metric": by,
               "test_accuracy": correct / max(total, 1), "test_error": 1 - correct / max(total, 1), "test_samples": total,
               "train_seconds": round(train_s, 2)}
        atomic_write_json(path, res)
        ck = os.path.join(runs_dir, name + ".pt")
        if os.path.exists(ck):
            os.unlink(ck)
        results.append(res)
        emit("curve_run", res)
    return _write_results(cfg, results)


SETTINGS_FILE = "_curve.json"
UNIT_FIELDS = {"strategy": str, "fraction": (int, float), "repeat": int, "kept": int, "epochs": int, "metric": str,
               "test_accuracy": (int, float), "test_error": (int, float), "test_samples": int, "train_seconds": (int, float)}


def _finished_unit(path: str) -> dict | None:
    """A finished unit's result, or None when it is missing or not a result this tool wrote (the unit
    then runs again and its file is replaced)."""
    if not os.path.exists(path):
        return None
    try:
        d = read_json(path)
    except TableError:
        return None
    ok = isinstance(d, dict) and all(isinstance(d.get(k), t) and not isinstance(d.get(k), bool) for k, t in UNIT_FIELDS.items())
    return d if ok else None


def _settings(cfg: CurveConfig, by: str, meta: dict) -> dict[str, Any]:
    """What a finished unit's result depends on, besides its own (strategy, fraction, repeat)."""
    train = {"model": cfg.score.get("model"), "epochs": cfg.epochs,
             **{k: cfg.score.get(k, default(ScoreConfig, k)) for k in ("batch_size", "lr", "weight_decay", "image_size", "seed")}}
    return {"train": cfg.train, "test": cfg.test, "scores": meta.get("shard_fingerprint"), "by": by,
            "same_epochs": cfg.same_epochs, "ccs_beta": cfg.ccs_beta, "class_balanced": cfg.class_balanced, **train}


def _check_settings(cfg: CurveConfig, by: str, meta: dict) -> None:
    """Resume only units made with the same settings: a rerun with other settings in the same --out
    would silently mix two experiments in one curve. --overwrite starts the curve afresh."""
    from .select import list_strategies

    path = os.path.join(cfg.out, SETTINGS_FILE)
    want = json.loads(json.dumps(_settings(cfg, by, meta)))
    runs = glob.glob(os.path.join(cfg.out, "runs", "*"))
    if cfg.overwrite:
        for f in runs:
            if os.path.basename(f).startswith(tuple(list_strategies())) and f.endswith((".json", ".pt")):
                os.unlink(f)
    elif os.path.exists(path):
        try:
            have = read_json(path)
        except TableError:
            have = None
        have = have if isinstance(have, dict) else {}  # unreadable: no unit can be shown to match
        diff = [f"{k} {have.get(k)!r} → {want[k]!r}" for k in want if have.get(k) != want[k]]
        if diff and runs:
            raise ConfigError(f"{cfg.out} holds curve runs made with other settings ({'; '.join(diff)}); "
                              "use another --out, or --overwrite to start this curve afresh")
    os.makedirs(cfg.out, exist_ok=True)
    atomic_write_json(path, want)


def _write_results(cfg: CurveConfig, results: list[dict]) -> dict[str, Any]:
    import pyarrow.csv as pcsv

    from .tables import write_parquet_atomic

    cols = ["strategy", "fraction", "repeat", "kept", "epochs", "metric", "test_accuracy", "test_error", "test_samples",
            "train_seconds"]
    rows = sorted(results, key=lambda d: (d["strategy"], -d["fraction"], d["repeat"]))
    table = pa.Table.from_pylist([{c: d[c] for c in cols} for d in rows])
    write_parquet_atomic(table, os.path.join(cfg.out, "curve.parquet"), {"kind": "curve", "config": asdict(cfg)})
    with atomic_path(os.path.join(cfg.out, "curve.csv")) as tmp:
        pcsv.write_csv(table, tmp)
    png = _plot(cfg, results)
    return {"out": cfg.out, "results": table.to_pylist(), "plot": png}


def _plot(cfg: CurveConfig, results: list[dict]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for k in cfg.keeps:
        rows = [d for d in results if d["strategy"] == k]
        fr = sorted({d["fraction"] for d in rows})
        mean = [np.mean([d["test_error"] for d in rows if d["fraction"] == f]) * 100 for f in fr]
        std = [np.std([d["test_error"] for d in rows if d["fraction"] == f]) * 100 for f in fr]
        ax.errorbar(fr, mean, yerr=std if cfg.repeats > 1 else None, marker="o", capsize=3, label=f"keep {k}" if k != "ccs" else "CCS")
    ax.set_xlabel("fraction of data kept")
    ax.set_ylabel("test error (%)")
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(cfg.fracs)))
    ax.set_xticklabels([f"{f:g}" for f in sorted(set(cfg.fracs))])
    ax.invert_xaxis()
    metric = results[0]["metric"] if results else ""
    ax.set_title(f"Pruning curve ({metric})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(cfg.out, "curve.png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
