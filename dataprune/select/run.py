"""`select`: score tables (ours or foreign) → the rows to keep → one parquet manifest for `export`.

Stage 1 (``gather``) reads only the columns the decision needs, ``plan_selection`` chooses, and
stage 2 streams the kept rows' locations into the manifest (``manifest.write_manifest``), its
columns decoded while the choice is computed. Memory stays columnar: a few numpy arrays of the
table's length, no Python object per row.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from ..config import SelectConfig
from ..errors import ConfigError, TableError
from ..manifest import MANIFEST_READ, write_manifest
from ..tables import META_FILE, base_meta
from .gather import Gathered, arrange_inputs, candidates, gather, resolve_metrics
from .inputs import Input
from .strategies import Selection, plan_selection, validate

COMBINED = "mean_rank"  # manifest column holding the combined score of `--by a,b`
PREFETCH_ROWS = 1_000_000  # rows of location columns decoded ahead while the choice is computed (~40 MB)


def run_select(inputs: list[str], cfg: SelectConfig, out: str | None = None, *, data: str | None = None,
               format: str | None = None, source_options: dict[str, Any] | None = None,
               dry_run: bool = False) -> dict[str, Any]:
    """Read the inputs, choose the rows and (unless ``dry_run``) write the manifest. Returns the summary."""
    t0 = time.perf_counter()
    validate(cfg)
    ins = arrange_inputs(inputs, data, format, source_options)
    base = ins[0]
    if not dry_run:
        if out is None:
            raise ConfigError("--out is required")
        if os.path.isdir(out):
            raise ConfigError(f"--out {out} is a directory; give the manifest's file name (e.g. {os.path.join(out, 'manifest.parquet')})")
        real_out = os.path.realpath(out)
        for i in ins:
            rp = os.path.realpath(i.path)
            if real_out == rp or real_out.startswith(rp.rstrip(os.sep) + os.sep):
                raise ConfigError(f"--out {out} would overwrite or go inside the input {i.path}")
        if not base.has_locations:
            raise ConfigError(f"{base.path} has scores but no sample locations, so its manifest could not be exported; "
                              "also pass a score table of the same dataset, or --data DATASET (--dry-run shows the plan)")
        if not base.meta.get("source"):
            raise TableError(f"{base.path}: {META_FILE} records no source dataset, so a manifest could not be exported")
    by, wants = resolve_metrics(cfg, ins)
    g = gather(cfg, ins, wants)
    cmask, score = candidates(cfg, g, by)
    take = (lambda a: a) if cmask is None else (lambda a: a[cmask])
    cand_ids = take(g.ids)
    cand_labels = take(g.labels) if g.labels is not None else None
    ncand = len(cand_ids)
    why = f" (excluded: {_fmt_counts(g.excluded)})" if any(g.excluded.values()) else ""
    if ncand == 0:
        raise TableError("no selectable rows left" + why)
    if cfg.class_balanced and (cand_labels is None or not (cand_labels >= 0).any()):
        raise ConfigError(f"--class-balanced needs labels, but {base.path} has none")
    if cfg.count is not None and cfg.count > ncand:
        raise ConfigError(f"--count {cfg.count} is more than the {ncand} selectable rows{why}")
    stage2 = None
    if not dry_run and base.kind == "table":  # decode the manifest's columns while the choice is computed
        per_file = max(1, len(g.ids) // max(1, len(base.files)))
        stage2 = base.pieces(MANIFEST_READ, ahead=PREFETCH_ROWS // per_file)
    try:
        sel = plan_selection(cfg, cand_ids, score, cand_labels)
        keep_full = sel.keep
        if cmask is not None:
            keep_full = np.zeros(len(g.ids), dtype=bool)
            keep_full[cmask] = sel.keep
        summary = _summary(cfg, base, g, by, sel, score)
        summary["classes_lost"] = lost = lost_classes(g.labels, cmask, keep_full, base.meta.get("classes"))
        inputs_meta = [{"path": os.path.abspath(i.path), "kind": i.kind, "fingerprint": i.fingerprint(),
                        "metrics": sorted(i.metrics)} for i in ins]
        result: dict[str, Any] = {"summary": summary, "config": _params(cfg, by), "inputs": inputs_meta, "out": None,
                                  "dry_run": dry_run, "warnings": [_lost_warning(c, cfg) for c in lost]}
        if not dry_run:
            score_cols: dict[str, np.ndarray] = {m: g.cols[m] for m in by}
            if len(by) > 1:
                full = np.full(len(g.ids), np.nan)
                full[keep_full] = score[sel.keep]
                score_cols[COMBINED] = full
            selection = {**result["config"], "summary": summary, "inputs": inputs_meta}
            meta = base_meta("manifest", base.meta.get("source"), base.meta.get("classes"), selection=selection,
                             rows=summary["kept"])
            write_manifest(out, base.schema, stage2 or base.pieces(MANIFEST_READ), g.ids, keep_full, score_cols, meta,
                           origin=base.path)
            result["out"] = out
    finally:
        if stage2 is not None:
            stage2.close()
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _summary(cfg: SelectConfig, base: Input, g: Gathered, by: list[str], sel: Selection,
             score: np.ndarray | None) -> dict[str, Any]:
    kept = int(np.count_nonzero(sel.keep))
    ncand = len(sel.keep)
    summary: dict[str, Any] = {
        "rows": len(g.ids), "candidates": ncand, "excluded": {k: v for k, v in g.excluded.items() if v},
        "budget": sel.budget, "kept": kept, "dropped": ncand - kept, "dropped_hardest": sel.dropped_hardest,
        "by": by, "score": COMBINED if len(by) > 1 else (by[0] if by else None), "joins": g.joins,
    }
    if score is not None:
        ks = score[sel.keep]
        summary["score_range"] = {"candidates": [float(score.min()), float(score.max())],
                                  "kept": [float(ks.min()), float(ks.max())]}
    if sel.per_class is not None:
        classes = base.meta.get("classes") or []
        pc_ = dict(sel.per_class)
        pc_["name"] = [classes[x] if x is not None and 0 <= x < len(classes) else None for x in pc_["label"]]
        summary["per_class"] = pc_
    if sel.strata is not None:
        summary["strata"] = sel.strata
    if base.kind == "table":
        summary["parts"] = {"finished": len(base.files), "shards": len(base.meta.get("shards") or [])}
    return summary


def lost_classes(labels: np.ndarray | None, cmask: np.ndarray | None, keep: np.ndarray,
                 classes: list[str] | None) -> list[dict[str, Any]]:
    """Classes of the input (labels ≥ 0) that keep no row: ``label``, ``name`` (None without class
    names), ``rows`` in the input and ``candidates`` among them, in label order."""
    if labels is None or not len(labels):
        return []
    valid = labels >= 0
    if not valid.any():
        return []
    hi = int(labels.max())
    values = None if hi < (1 << 24) else np.unique(labels[valid])  # class numbers are counted directly

    def count(mask: np.ndarray | None) -> np.ndarray:
        m = valid if mask is None else valid & mask
        lab = labels[m]
        if values is None:
            return np.bincount(lab, minlength=hi + 1)
        return np.bincount(np.searchsorted(values, lab), minlength=len(values))

    rows, cand, kept = count(None), count(cmask), count(keep)
    out = []
    for c in np.flatnonzero((rows > 0) & (kept == 0)).tolist():
        label = c if values is None else int(values[c])
        name = classes[label] if classes and label < len(classes) and isinstance(classes[label], str) else None
        out.append({"label": label, "name": name, "rows": int(rows[c]), "candidates": int(cand[c])})
    return out


def _lost_warning(c: dict[str, Any], cfg: SelectConfig) -> str:
    """One line naming a class that keeps no row, and why."""
    what = f"class {c['label']}" + (f" ({c['name']})" if c["name"] else "")
    if not c["candidates"]:
        return (f"{what} keeps none of its {c['rows']:,} rows: none was selectable (all left out before the choice; see "
                "'excluded'); the selection has no sample of this class")
    how = "--strategy ccs" if cfg.keep_mode == "ccs" else f"--keep {cfg.keep_mode}"
    how += f" --frac {cfg.frac:g}" if cfg.frac is not None else f" --count {cfg.count}"
    hint = "" if cfg.class_balanced else "; --class-balanced gives every class its share of the budget"
    return f"{what} keeps none of its {c['rows']:,} rows ({c['candidates']:,} selectable): {how} dropped them all{hint}"


def _params(cfg: SelectConfig, by: list[str]) -> dict[str, Any]:
    p = asdict(cfg)
    p["by"] = by
    p["keep"] = cfg.keep_mode
    return p


def _fmt_counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())
