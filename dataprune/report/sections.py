"""The report's first sections — summary, one section per metric, label-noise suspects — computed
with numpy on whole columns (one sort per metric); only the rows a grid shows become Python values."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..ranks import average_ranks, spearman
from . import plots
from .html import Grid, Section, esc, img, note, num, table
from .load import DYNAMICS, Table, reasons

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
BINS = 60


def _short(v: Any, limit: int = 80) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def scored(t: Table, col: str) -> np.ndarray:
    """Rows with a finite value of ``col`` and status ok."""
    return t.ok & np.isfinite(t.metrics[col])


def summary(t: Table, notes: list[str]) -> Section:
    s = Section("summary", "Summary")
    meta, src = t.meta, t.meta.get("source") if isinstance(t.meta.get("source"), dict) else {}
    nlab = int((t.labels >= 0).sum()) if t.labels is not None else 0
    facts = [("score table", t.path), ("dataset", f"{src.get('path', '—')} ({src.get('format', '?')})"),
             ("rows", t.n), ("scored (status ok)", int(t.ok.sum())), ("labelled rows", nlab),
             ("classes", len(t.classes) if t.classes else (int(t.labels.max()) + 1 if nlab else 0)),
             ("made by", f"{meta.get('tool', '?')} {meta.get('version', '')}")]
    s.add(table(["", ""], facts))
    for n_ in notes:
        s.add(note(n_))
    if t.classes:
        shown = ", ".join(t.classes[:30]) + (f", … ({len(t.classes)} in all)" if len(t.classes) > 30 else "")
        s.add(f"<p><b>Classes:</b> {esc(shown)}</p>")
    if t.metrics:
        rows = []
        for c, v in t.metrics.items():
            info, m = t.info.get(c) or {}, scored(t, c)
            rng = info.get("range")
            rows.append([c, info.get("metric", c), "—" if not rng else f"[{num(rng[0])}, {num(rng[1])}]",
                         info.get("direction", "higher = harder"), float(v[m].min()) if m.any() else None,
                         float(v[m].max()) if m.any() else None, int(t.n - m.sum()), _short(info.get("params", {}), 60)])
        s.add("<h3>Metrics</h3>", table(["column", "metric", "documented range", "direction", "min", "max", "not scored",
                                           "parameters"], rows))
    else:
        s.add(note("The table has no metric columns."))
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    if cfg:
        keep = [(k, _short(v)) for k, v in sorted(cfg.items()) if v not in (None, "", [], {})]
        s.add("<h3>Run parameters</h3>", table(["parameter", "value"], keep))
    rel = meta.get("reliability")
    if isinstance(rel, dict) and rel:
        s.add("<h3>Reliability</h3><p class=\"muted\">Spearman correlation of the scores from half of the runs against the "
              "other half (--runs ≥ 2).</p>", table(["metric", "split-half Spearman"], [(k, v) for k, v in rel.items()]))
    else:
        s.add("<p class=\"muted\">Reliability: not measured (score with --runs 2 or more).</p>")
    why = reasons(t)
    if why:
        s.add("<h3>Rows not scored, by reason</h3>", table(["reason", "rows"], list(why.items())))
    return s


def _caption(t: Table, rows: list[dict], col: str | None, values: np.ndarray | None, idx: list[int]) -> list[list[str]]:
    out = []
    for i, r in zip(idx, rows):
        lines = [str(r.get("key")), t.class_name(r.get("label"))]
        if col is not None:
            lines.append(f"{col} {num(float(values[i]), 3)}")
        out.append(lines)
    return out


def grid(t: Table, title: str, idx: np.ndarray, col: str | None = None, extra=None, css=None, empty: str = "no rows") -> Grid:
    """A thumbnail grid of rows ``idx`` captioned with key, class and the score of ``col``."""
    idx = [int(i) for i in idx]
    rows = t.rows(np.asarray(idx, np.int64))
    lines = _caption(t, rows, col, t.metrics.get(col) if col else None, idx)
    if extra is not None:
        for j, i in enumerate(idx):
            lines[j] += extra(i)
    return Grid(title, idx, lines, list(css) if css is not None else [], empty)


def _per_class(t: Table, v: np.ndarray, m: np.ndarray):
    """Rows of labelled classes sorted by (label, score): the row indices, per-class start and count."""
    if t.labels is None:
        return None
    lm = m & (t.labels >= 0)
    if not lm.any():
        return None
    rows = np.flatnonzero(lm)
    lab = t.labels[rows]
    order = np.lexsort((v[rows], lab))
    rows, lab = rows[order], lab[order]
    k = max(int(lab[-1]) + 1, len(t.classes))
    start = np.searchsorted(lab, np.arange(k), "left")
    count = np.searchsorted(lab, np.arange(k), "right") - start
    return rows, start, count


def metric_section(t: Table, col: str, out: str, k: int, max_classes: int, slug: str) -> Section:
    info = t.info.get(col) or {}
    s = Section(f"metric-{slug}", f"Metric: {col}")
    if info.get("description"):
        s.add(f'<p class="muted">{esc(info["description"])} · {esc(info.get("direction", "higher = harder"))}</p>')
    v = t.metrics[col]
    m = scored(t, col)
    if not m.any():
        return s.add(note(f"{col}: no row has a finite score (all NaN or not scored) — nothing to plot or rank."))
    vals = v[m]
    lo, hi = float(vals.min()), float(vals.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1)
    counts = np.histogram(vals, bins=edges)[0]
    q = np.quantile(vals, QUANTILES)
    s.add('<div class="row"><div class="col">', "<h3>Distribution</h3>",
          img(plots.histogram(out, f"{slug}-hist", col, edges, counts), f"distribution of {col}"),
          table(["rows scored", "min", "5 %", "median", "95 %", "max", "NaN / not scored"],
                [[int(m.sum()), lo, *map(float, (q[0], q[2], q[4])), hi, int(t.n - m.sum())]]), "</div>")
    pc = _per_class(t, v, m)
    if pc is None:
        s.add("</div>", note("The table has no labels: no per-class distribution; the grids below rank all rows."))
        order = np.flatnonzero(m)[np.argsort(vals, kind="stable")]
        return s.add("<h3>Hardest and easiest rows</h3>", grid(t, f"hardest {2 * k}", order[::-1][: 2 * k], col),
                     grid(t, f"easiest {2 * k}", order[: 2 * k], col))
    rows, start, count = pc
    present = np.flatnonzero(count)
    names = [t.class_name(int(c)) for c in present]
    s.add('<div class="col"><h3>Per class</h3>')
    if len(present) <= plots.SMALL_MULTIPLES:
        bins = np.clip(np.searchsorted(edges, v[rows], "right") - 1, 0, BINS - 1)
        cls = t.labels[rows]
        per = np.bincount(cls * BINS + bins, minlength=(int(present[-1]) + 1) * BINS).reshape(-1, BINS)[present]
        s.add(img(plots.class_histograms(out, f"{slug}-classes", col, edges, per, names), f"{col} per class"))
    else:
        pos = start[present][:, None] + (np.asarray(QUANTILES)[None, :] * (count[present][:, None] - 1)).astype(np.int64)
        s.add(img(plots.class_bands(out, f"{slug}-classes", col, v[rows][pos], names), f"{col} per class"))
    med = v[rows][start[present] + (count[present] - 1) // 2]
    s.add("</div></div>")
    if len(present) <= 30:
        s.add(table(["class", "rows", "median", "max"], [[n_, int(count[c]), float(md), float(v[rows][start[c] + count[c] - 1])]
                                                        for n_, c, md in zip(names, present, med)]))
    shown = present
    if len(present) > max_classes:
        shown = present[np.argsort(-med, kind="stable")[:max_classes]]
        s.add(note(f"{len(present)} classes: the grids show the {max_classes} with the highest median {col} "
                   "(--max-classes to show more)."))
    s.add(f"<h3>Hardest and easiest {k} of each class</h3>")
    for c in shown:
        a, n_ = int(start[c]), int(count[c])
        seg = rows[a:a + n_]
        s.add(f"<h4>{esc(t.class_name(int(c)))} <small>({n_} rows)</small></h4>", '<div class="row"><div class="col">',
              grid(t, "hardest", seg[::-1][:k], col), '</div><div class="col">', grid(t, "easiest", seg[:k], col), "</div></div>")
    return s


def correlation_section(t: Table, out: str) -> Section | None:
    cols = [c for c in t.metrics if scored(t, c).sum() >= 3]
    if len(cols) < 2:
        return None
    s = Section("correlations", "Metric-to-metric rank correlations")
    m = np.logical_and.reduce([scored(t, c) for c in cols])
    if m.sum() < 3:
        return s.add(note("Too few rows are scored by every metric to correlate them."))
    rho = np.eye(len(cols))
    for a in range(len(cols)):
        for b in range(a + 1, len(cols)):
            rho[a, b] = rho[b, a] = spearman(t.metrics[cols[a]][m], t.metrics[cols[b]][m])
    return s.add(f"<p class=\"muted\">Spearman correlation on the {int(m.sum()):,} rows every metric scored.</p>",
                 img(plots.correlations(out, "correlations", cols, rho), "rank correlations"))


def dynamics_columns(t: Table) -> list[str]:
    return [c for c in t.metrics if (t.info.get(c) or {}).get("metric", c) in DYNAMICS]


def suspects(t: Table, top: int) -> tuple[np.ndarray, list[str]]:
    """Rows the training-dynamics metrics rank hardest (mean of their ranks), hardest first."""
    cols = dynamics_columns(t)
    if not cols or t.labels is None:
        return np.zeros(0, np.int64), cols
    m = np.logical_and.reduce([scored(t, c) for c in cols]) & (t.labels >= 0)
    rows = np.flatnonzero(m)
    if not len(rows):
        return rows, cols
    rank = np.zeros(len(rows))
    for c in cols:
        rank += average_ranks(t.metrics[c][rows]) / len(cols)
    top = min(top, len(rows))
    part = np.argpartition(-rank, top - 1)[:top]
    return rows[part[np.argsort(-rank[part], kind="stable")]], cols


def noise_section(t: Table, top: int) -> Section:
    s = Section("label-noise", "Label-noise suspects")
    if t.labels is None:
        return s.add(note("The table has no labels: label noise cannot be judged."))
    idx, cols = suspects(t, top)
    if not cols:
        return s.add(note("No training-dynamics metric (forgetting, aum, el2n) in this table: score with "
                          "--metric el2n,forgetting,aum to find likely mislabelled rows."))
    if not len(idx):
        return s.add(note(f"No labelled row is scored by every one of {', '.join(cols)}."))
    pred = t.extra.get("pred_label")
    prob = t.extra.get("pred_prob")
    s.add(f"<p>The {len(idx)} rows that {esc(', '.join(cols))} rank hardest together (mean rank), hardest first, "
          "with their assigned label" + (" and the proxy model's prediction" if pred is not None else "") + ".</p>")
    if pred is None:
        s.add('<p class="muted">The table has no pred_label / pred_prob columns (the proxy\'s prediction), so only the '
              "assigned label is shown.</p>")

    def extra(i: int) -> list[str]:
        if pred is None or not np.isfinite(pred[i]):
            return []
        p = f"pred {t.class_name(int(pred[i]))}"
        return [p + (f" ({prob[i]:.2f})" if prob is not None and np.isfinite(prob[i]) else "")]

    css = ["sus" if pred is not None and np.isfinite(pred[i]) and int(pred[i]) != t.labels[i] else "" for i in idx]
    s.add(grid(t, "", idx, cols[0], extra=extra, css=css))
    if pred is not None:
        ok = np.isfinite(pred[idx])
        disagree = int((pred[idx][ok].astype(np.int64) != t.labels[idx][ok]).sum())
        s.add(f"<p>The proxy disagrees with the assigned label on {disagree} of these {int(ok.sum())} rows (red border).</p>")
    return s
