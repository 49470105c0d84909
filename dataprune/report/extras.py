"""The report's optional sections: duplicates (a table with dedup columns), selection (with
``--manifest``) and the pruning curve (with ``--curve``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import plots
from .html import Grid, Section, esc, img, note, num, table
from .load import Manifest, Table
from .sections import grid, scored


def duplicates_section(t: Table, groups: int, per_group: int) -> Section | None:
    g = t.extra.get("dup_group")
    if g is None:
        return None
    s = Section("duplicates", "Duplicates")
    isdup = t.extra.get("is_duplicate")
    sim = t.extra.get("dup_max_sim")
    member = np.isfinite(g) & (g >= 0)
    if not member.any():
        return s.add(note("The dedup columns flag no duplicates."))
    rows = np.flatnonzero(member)
    gid = g[rows].astype(np.int64)
    order = np.argsort(gid, kind="stable")
    rows, gid = rows[order], gid[order]
    starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
    sizes = np.diff(np.r_[starts, len(rows)])
    strength = np.maximum.reduceat(np.nan_to_num(sim[rows], nan=1.0), starts) if sim is not None else sizes.astype(float)
    pick = np.lexsort((-sizes, -strength))[:groups]
    dropped = int(isdup.sum()) if isdup is not None else int(len(rows) - len(starts))
    s.add(f"<p>{len(starts):,} duplicate groups holding {len(rows):,} rows; {dropped:,} of them are marked redundant "
          "(is_duplicate), one copy per group is kept. Showing the "
          f"{len(pick)} groups with the highest similarity (green border: the copy kept).</p>")
    for j in pick:
        a, n = int(starts[j]), int(sizes[j])
        members = rows[a:a + min(n, per_group)]
        css = ["kept" if isdup is not None and not isdup[i] else "" for i in members]

        def extra(i: int) -> list[str]:
            lines = [] if sim is None or not np.isfinite(sim[i]) else [f"sim {sim[i]:.3f}"]
            return lines + (["kept" if not isdup[i] else "duplicate"] if isdup is not None else [])

        title = f"group {int(gid[a])} · {n} rows" + ("" if sim is None else f" · max similarity {num(float(strength[j]), 3)}")
        blk = grid(t, title, members, None, extra=extra, css=css)
        s.add('<div class="dup">', blk, "</div>")
    return s


def selection_section(t: Table, man: Manifest, by: str | None, k: int, out: str, seed: int = 0) -> Section:
    s = Section("selection", "Selection")
    kept = np.isin(t.ids, man.ids)
    sel = man.meta.get("selection") if isinstance(man.meta.get("selection"), dict) else {}
    summ = sel.get("summary") if isinstance(sel.get("summary"), dict) else {}
    nk = int(kept.sum())
    s.add(f"<p>Manifest {esc(man.path)}: {len(man.ids):,} rows kept; {nk:,} of them are rows of this table, "
          f"{t.n - nk:,} rows of the table are not kept.</p>")
    if nk < len(man.ids):
        s.add(note(f"{len(man.ids) - nk:,} manifest rows are not in this score table (another table or dataset?)."))
    params = [(key, v) for key, v in sorted(sel.items()) if key not in ("summary", "inputs") and not isinstance(v, (dict, list))]
    if params:
        s.add("<h3>Selection parameters</h3>", table(["parameter", "value"], params))
    if t.labels is not None and (t.labels >= 0).any():
        lab = t.labels
        valid = lab >= 0
        kk = int(lab.max()) + 1
        kc = np.bincount(lab[valid & kept], minlength=kk)
        dc = np.bincount(lab[valid & ~kept], minlength=kk)
        present = np.flatnonzero(kc + dc)
        names = [t.class_name(int(c)) for c in present]
        s.add(img(plots.kept_per_class(out, "selection-classes", kc[present], dc[present], names), "kept per class"))
        if len(present) <= 50:
            s.add(table(["class", "kept", "dropped", "kept %"], [[n, int(kc[c]), int(dc[c]), 100.0 * kc[c] / max(1, kc[c] + dc[c])]
                                                                  for n, c in zip(names, present)]))
    else:
        s.add(note("The table has no labels: no per-class counts."))
    col = by if by in t.metrics else (summ.get("score") if summ.get("score") in t.metrics else next(iter(t.metrics), None))
    if col is not None:
        m = scored(t, col)
        v = t.metrics[col]
        rows = []
        for name, mask in (("kept", m & kept), ("dropped", m & ~kept)):
            rows.append([name, int(mask.sum()), float(v[mask].min()) if mask.any() else None,
                         float(np.median(v[mask])) if mask.any() else None, float(v[mask].max()) if mask.any() else None])
        s.add(f"<h3>Score ranges ({esc(col)})</h3>", table(["rows", "count", "min", "median", "max"], rows))
    strata = summ.get("strata")
    if isinstance(strata, dict) and strata:
        keys = [key for key, v in strata.items() if isinstance(v, list)]
        if keys:
            n = max(len(strata[key]) for key in keys)
            s.add("<h3>CCS strata</h3>", table(keys, [[_cell(strata[key], i) for key in keys] for i in range(n)]))
        else:
            s.add("<h3>CCS strata</h3>", table(["field", "value"], [(key, str(v)) for key, v in strata.items()]))
    elif isinstance(strata, list) and strata:
        s.add("<h3>CCS strata</h3>", table(["stratum", "value"], [(i, str(v)) for i, v in enumerate(strata)]))
    rng = np.random.default_rng(seed)
    for name, mask, css in (("kept", kept, "kept"), ("dropped", ~kept, "")):
        pool = np.flatnonzero(mask & t.ok)
        pick = np.sort(rng.choice(pool, size=min(2 * k, len(pool)), replace=False)) if len(pool) else pool
        if col is not None and len(pick):
            pick = pick[np.argsort(-np.nan_to_num(t.metrics[col][pick], nan=-np.inf), kind="stable")]
        s.add(grid(t, f"a random sample of {name} rows", pick, col, css=[css] * len(pick), empty=f"no {name} rows"))
    return s


def _cell(values: list, i: int):
    v = values[i] if i < len(values) else None
    return v if isinstance(v, (int, float, str)) or v is None else str(v)


def curve_section(curve: pa.Table, out: str, source: str) -> Section:
    s = Section("curve", "Pruning curve")
    strat = [str(x) for x in curve["strategy"].to_pylist()]
    try:
        frac = np.asarray(curve["fraction"].cast(pa.float64()).to_numpy(zero_copy_only=False), float)
        err = np.asarray(curve["test_error"].cast(pa.float64()).to_numpy(zero_copy_only=False), float)
    except (pa.ArrowException, ValueError) as e:
        return s.add(note(f"{source}: fraction / test_error are not numbers ({e})."))
    series = {}
    rows = []
    for st in dict.fromkeys(strat):
        m = np.array([x == st for x in strat]) & np.isfinite(frac) & np.isfinite(err)
        fr = np.unique(frac[m])
        mean = np.array([err[m & (frac == f)].mean() for f in fr])
        std = np.array([err[m & (frac == f)].std() for f in fr])
        series[st] = (fr, mean, std)
        rows += [[st, float(f), float(e) * 100] for f, e in zip(fr, mean)]
    if not rows:
        return s.add(note(f"{source}: no finished unit with a test error."))
    s.add(f'<p class="muted">From {esc(source)}.</p>', img(plots.curve(out, "curve", series), "pruning curve"),
          table(["strategy", "fraction kept", "test error %"], rows))
    return s


__all__ = ["Grid", "curve_section", "duplicates_section", "selection_section"]
