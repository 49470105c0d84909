"""`dataprune report`: the driver. Read the table (and manifest, curve), build every section, make the
thumbnails of the rows the sections show (only those), write ``OUT/index.html`` last.

Every file is written atomically under ``--out`` and under names this module makes (``index.html``,
``assets/``, ``plots/``, ``thumbs/<sample_id>.png``): nothing from the table or manifest names a path."""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np

from ..config import ReportConfig
from ..errors import ConfigError
from ..tables import atomic_write_bytes
from . import extras, sections
from .html import Section, note, page
from .load import read_curve, read_kept, read_table
from .thumbs import PLACEHOLDER, make_thumbs, placeholder_png

INDEX = "index.html"


def _prepare_out(out: str) -> None:
    if os.path.isfile(out) or (os.path.islink(out) and not os.path.exists(out)):
        raise ConfigError(f"--out {out} is a file, not a directory: choose a directory (it is created when missing)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is not a directory")
    try:
        os.makedirs(os.path.join(out, "assets"), exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror or e})") from None


def _slug(i: int, name: str) -> str:
    return f"{i}-" + (re.sub(r"[^A-Za-z0-9_]+", "-", name)[:40].strip("-") or "m")


def build_report(cfg: ReportConfig) -> dict[str, Any]:
    """Write the report of ``cfg.scores`` into ``cfg.out``; return what was written and what was noted."""
    cfg.validate()
    t0 = time.perf_counter()
    out = cfg.out
    _prepare_out(out)
    timings: dict[str, float] = {}
    t = read_table(cfg.scores, cfg.by)
    man = read_kept(cfg.manifest) if cfg.manifest else None
    curve = read_curve(cfg.curve) if cfg.curve else None
    timings["read"] = time.perf_counter() - t0
    atomic_write_bytes(os.path.join(out, PLACEHOLDER), placeholder_png(max(32, cfg.thumb_size // 2)))
    atomic_write_bytes(os.path.join(out, "assets", "favicon.png"), placeholder_png(16))
    notes: list[str] = []
    if t.labels is None:
        notes.append("The table has no labels: per-class views and label-noise suspects are left out.")
    body: list[Section] = []
    for i, col in enumerate(t.metrics):
        body.append(sections.metric_section(t, col, out, cfg.k, cfg.max_classes, _slug(i, col)))
        if not sections.scored(t, col).any():
            notes.append(f"Metric {col}: every score is NaN (or the row was not scored); its section says so.")
    corr = sections.correlation_section(t, out)
    if corr is not None:
        body.append(corr)
    if cfg.suspects:
        body.append(sections.noise_section(t, cfg.suspects))
    if cfg.dup_groups:
        dup = extras.duplicates_section(t, cfg.dup_groups, 6)
        if dup is not None:
            body.append(dup)
    if man is not None:
        body.append(extras.selection_section(t, man, cfg.by[0] if cfg.by else None, cfg.k, out))
    if curve is not None:
        body.append(extras.curve_section(curve, out, os.path.join(cfg.curve, "curve")))
    timings["sections"] = time.perf_counter() - t0 - timings["read"]
    wanted = [i for s in body for g in s.grids() for i in g.idx]
    t1 = time.perf_counter()
    thumbs, tstats = make_thumbs(out, t, np.asarray(wanted, np.int64), cfg.thumb_size)
    timings["thumbnails"] = time.perf_counter() - t1
    if tstats["note"]:
        notes.append(f"Thumbnails: {tstats['note']}; the grids show placeholders.")
    elif tstats["failed"]:
        why = ", ".join(f"{k} {v}" for k, v in tstats["failed"].items())
        notes.append(f"Thumbnails: {sum(tstats['failed'].values())} of {tstats['wanted']} could not be made ({why}); "
                     "they show placeholders.")
    summary = sections.summary(t, notes)
    if not t.metrics:
        body.insert(0, Section("metrics", "Metrics").add(note("No metric columns: nothing to rank.")))
    allsec = [summary] + body
    src = t.meta.get("source") if isinstance(t.meta.get("source"), dict) else {}
    title = f"dataprune report · {os.path.basename(str(src.get('path') or t.path).rstrip('/')) or t.path}"
    subtitle = f"{t.n:,} rows · {len(t.metrics)} metric(s) · {t.path}"
    html = page(title, subtitle, allsec, thumbs)
    index = os.path.join(out, INDEX)
    atomic_write_bytes(index, html.encode("utf-8"))
    return {"out": out, "index": index, "rows": t.n, "metrics": list(t.metrics), "sections": [s.title for s in allsec],
            "thumbnails": {"wanted": tstats["wanted"], "made": tstats["made"], "failed": tstats["failed"]},
            "notes": notes, "timings": {k: round(v, 3) for k, v in timings.items()},
            "seconds": round(time.perf_counter() - t0, 3)}
