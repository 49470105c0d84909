"""`select`: score tables (ours or foreign) → the rows to keep → one parquet manifest for `export`.

Stage 1 (``gather``) reads only the columns the decision needs, ``plan_selection`` chooses, and
stage 2 streams the kept rows' locations into the manifest (``manifest.write_manifest``), its
columns decoded while the choice is computed. Memory stays columnar: a few numpy arrays of the
table's length, no Python object per row. When those arrays would exceed the memory limit
(``--memory-limit``, default SELECT_MEMORY_FRACTION of the RAM) the choice is taken out of core
(``stream``), which writes the same manifest; what cannot stream runs in memory with a warning.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import DIRECTIONS, SELECT_MEMORY_FRACTION, SelectConfig
from ..errors import ConfigError, TableError
from ..manifest import MANIFEST_READ, write_manifest, write_manifest_rows
from ..tables import META_FILE, base_meta
from .gather import arrange_inputs, candidates, gather, resolve_metrics
from .inputs import Input
from .stream import Stream
from .strategies import STRATEGIES, get_strategy, plan_selection, validate
from .tally import DENSE, as_float, lost_list

COMBINED = "mean_rank"  # manifest column holding the combined score of `--by a,b`
PREFETCH_ROWS = 1_000_000  # rows of location columns decoded ahead while the choice is computed (~40 MB)


BYTES_PER_COLUMN_BYTE = 4  # in-memory peak per byte of decision column (measured: bench_select, 10M rows, 756 MB)
BUILTIN = {n: STRATEGIES.lookup(n).choose for n in ("hard", "easy", "random", "ccs")}


def why_not(cfg: SelectConfig, ins: list[Input], by: list[str]) -> str | None:
    """Why this selection must run in memory, or None when it can stream."""
    if ins[0].kind != "table":
        return f"{ins[0].path} is not a score table"
    if len(ins) > 1:
        return "joining several inputs needs the base's keys in memory"
    if len(by) > 1:
        return "--by a,b combines metrics by mean rank, which needs every row's rank"
    s = get_strategy(cfg.keep_mode)
    if BUILTIN.get(s.name) is not s.choose:
        return f"the strategy {s.name!r} is not built in (its choose() takes whole columns)"
    return None


def in_memory_bytes(base: Input, by: list[str], dedup: bool) -> int:
    """Estimated peak of the in-memory path: its decision columns (id, label, status, scores,
    duplicates) times BYTES_PER_COLUMN_BYTE (the copies and sort keys the choice makes)."""
    types = {f.name: f.type for f in base.schema}
    per = 8 + 4 + 2 + sum(4 if types.get(m) == pa.float32() else 8 for m in by) + (1 if dedup else 0)
    return base.num_rows() * per * BYTES_PER_COLUMN_BYTE


def run_select(inputs: list[str], cfg: SelectConfig, out: str | None = None, *, data: str | None = None,
               format: str | None = None, source_options: dict[str, Any] | None = None,
               dry_run: bool = False) -> dict[str, Any]:
    """Read the inputs, choose the rows and (unless ``dry_run``) write the manifest. Returns the summary.
    In memory, or out of core (``stream``) when the in-memory estimate exceeds the memory limit: the
    same manifest either way."""
    t0 = time.perf_counter()
    validate(cfg)
    ins = arrange_inputs(inputs, data, format, source_options, direction=cfg.direction, expect_rows=cfg.expect_rows)
    if cfg.direction != DIRECTIONS[0] and not any(i.kind == "file" for i in ins):  # it would change nothing
        raise ConfigError(f"--direction {cfg.direction} applies to foreign score files, and none is given (a score "
                          "table's columns are higher = harder); to keep the easy end use --keep easy")
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
    limit = cfg.memory_limit or default_memory_limit()
    warnings: list[str] = []
    mode = "memory"
    if base.kind == "table" and in_memory_bytes(base, by, cfg.dedup) > limit:
        reason = why_not(cfg, ins, by)
        if reason is None:
            mode = "stream"
        else:
            warnings.append(f"the decision columns of {base.path} exceed the memory limit ({limit / 1e9:.2f} GB), but "
                            f"{reason}: selecting in memory")
    inputs_meta = [{"path": os.path.abspath(i.path), "kind": i.kind, "fingerprint": i.fingerprint(),
                    "metrics": sorted(i.metrics)} | ({"direction": i.direction} if i.kind == "file" else {}) for i in ins]
    run = _run_stream if mode == "stream" else _run_memory
    result = run(cfg, ins, by, wants, out, dry_run, inputs_meta, limit)
    result["warnings"] = warnings + result["warnings"]
    result["mode"] = mode
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _check_candidates(cfg: SelectConfig, base: Input, ncand: int, excluded: dict[str, int], has_labels: bool) -> None:
    why = f" (excluded: {_fmt_counts(excluded)})" if any(excluded.values()) else ""
    if ncand == 0:
        raise TableError("no selectable rows left" + why)
    if cfg.class_balanced and not has_labels:
        raise ConfigError(f"--class-balanced needs labels, but {base.path} has none")
    if cfg.count is not None and cfg.count > ncand:
        raise ConfigError(f"--count {cfg.count} is more than the {ncand} selectable rows{why}")


def _meta(cfg: SelectConfig, base: Input, by: list[str], summary: dict[str, Any], inputs_meta: list) -> dict[str, Any]:
    selection = {**_params(cfg, by), "summary": summary, "inputs": inputs_meta}
    return base_meta("manifest", base.meta.get("source"), base.meta.get("classes"), selection=selection,
                     rows=summary["kept"])


def _result(cfg: SelectConfig, by: list[str], summary: dict[str, Any], inputs_meta: list, lost: list,
            dry_run: bool) -> dict[str, Any]:
    summary["classes_lost"] = lost
    return {"summary": summary, "config": _params(cfg, by), "inputs": inputs_meta, "out": None, "dry_run": dry_run,
            "warnings": [_lost_warning(c, cfg) for c in lost]}


def _run_memory(cfg: SelectConfig, ins: list[Input], by: list[str], wants: dict, out: str | None, dry_run: bool,
                inputs_meta: list, limit: int) -> dict[str, Any]:
    base = ins[0]
    g = gather(cfg, ins, wants)
    cmask, score = candidates(cfg, g, by)
    take = (lambda a: a) if cmask is None else (lambda a: a[cmask])
    cand_ids = take(g.ids)
    cand_labels = take(g.labels) if g.labels is not None else None
    _check_candidates(cfg, base, len(cand_ids), g.excluded, cand_labels is not None and bool((cand_labels >= 0).any()))
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
        rng = None
        if score is not None:
            ks = score[sel.keep]
            rng = {"candidates": [as_float(score.min()), as_float(score.max())], "kept": [as_float(ks.min()), as_float(ks.max())]}
        summary = _summary(cfg, base, len(g.ids), len(sel.keep), g.excluded, g.joins, by, int(np.count_nonzero(sel.keep)),
                           sel.budget, sel.dropped_hardest, rng, sel.per_class, sel.strata)
        lost = lost_classes(g.labels, cmask, keep_full, base.meta.get("classes"))
        result = _result(cfg, by, summary, inputs_meta, lost, dry_run)
        if not dry_run:
            score_cols: dict[str, np.ndarray] = {m: g.cols[m] for m in by}
            if len(by) > 1:
                full = np.full(len(g.ids), np.nan)
                full[keep_full] = score[sel.keep]
                score_cols[COMBINED] = full
            write_manifest(out, base.schema, stage2 or base.pieces(MANIFEST_READ), g.ids, keep_full, score_cols,
                           _meta(cfg, base, by, summary, inputs_meta), origin=base.path)
            result["out"] = out
    finally:
        if stage2 is not None:
            stage2.close()
    return result


def _run_stream(cfg: SelectConfig, ins: list[Input], by: list[str], wants: dict, out: str | None, dry_run: bool,
                inputs_meta: list, limit: int) -> dict[str, Any]:
    base = ins[0]
    st = Stream(cfg, base, by, limit)
    st.count()
    _check_candidates(cfg, base, st.ncand, st.excluded, st.has_class_labels())
    st.decide()
    st.tally()
    p = st.summary_parts()
    summary = _summary(cfg, base, st.rows, st.ncand, st.excluded, [], by, p["kept"], p["budget"], p["dropped_hardest"],
                       p["score_range"], p["per_class"], p["strata"])
    vals, rows, cand, kept = st.lost()
    lost = lost_list(vals, rows, cand, kept, base.meta.get("classes"))
    result = _result(cfg, by, summary, inputs_meta, lost, dry_run)
    if not dry_run:
        types = {f.name: f.type for f in base.schema}
        score_types = {m: np.dtype(np.float32 if types[m] == pa.float32() else np.float64) for m in by}
        write_manifest_rows(out, base.schema, score_types, st.pieces(), _meta(cfg, base, by, summary, inputs_meta))
        result["out"] = out
    result["passes"] = st.passes
    return result


def default_memory_limit() -> int:
    """SELECT_MEMORY_FRACTION of the machine's physical memory (8 GB when it cannot be read)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 10**9
    return int(total * SELECT_MEMORY_FRACTION)


def _summary(cfg: SelectConfig, base: Input, rows: int, ncand: int, excluded: dict[str, int], joins: list, by: list[str],
             kept: int, budget: int, dropped_hardest: int, score_range: dict | None, per_class: dict | None,
             strata: list | None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "rows": rows, "candidates": ncand, "excluded": {k: v for k, v in excluded.items() if v},
        "budget": budget, "kept": kept, "dropped": ncand - kept, "dropped_hardest": dropped_hardest,
        "by": by, "score": COMBINED if len(by) > 1 else (by[0] if by else None), "joins": joins,
    }
    if score_range is not None:
        summary["score_range"] = score_range
    if per_class is not None:
        classes = base.meta.get("classes") or []
        pc_ = dict(per_class)
        pc_["name"] = [classes[x] if x is not None and 0 <= x < len(classes) else None for x in pc_["label"]]
        summary["per_class"] = pc_
    if strata is not None:
        summary["strata"] = strata
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
    values = None if hi < DENSE else np.unique(labels[valid])  # class numbers are counted directly

    def count(mask: np.ndarray | None) -> np.ndarray:
        m = valid if mask is None else valid & mask
        lab = labels[m]
        if values is None:
            return np.bincount(lab, minlength=hi + 1)
        return np.bincount(np.searchsorted(values, lab), minlength=len(values))

    rows, cand, kept = count(None), count(cmask), count(keep)
    vals = np.arange(len(rows)) if values is None else values
    return lost_list(vals, rows, cand, kept, classes)


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
    p.pop("memory_limit")  # how the choice is computed, not what it is: both paths write the same manifest
    p["by"] = by
    p["keep"] = cfg.keep_mode
    return p


def _fmt_counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())
