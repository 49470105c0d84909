"""`dataprune report`: one HTML page (with its plots and thumbnails) showing what a score table says."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .. import render
from ..config import DEFAULT_REPORT, DEFAULT_SCORES, ReportConfig, from_options
from .app import command, next_step
from .options import check_out, d, shell_path


@command
def report(
    scores: Optional[str] = typer.Argument(None, metavar="SCORES", help=f"Score table (the --out of `score`). Default: {DEFAULT_SCORES}."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="A manifest from `select`: kept/dropped per class, score ranges "
                                            "kept, CCS strata, kept and dropped images side by side."),
    curve: Optional[Path] = typer.Option(None, "--curve", help="The --out of `dataprune curve`: test error vs fraction per strategy."),
    by: Optional[str] = typer.Option(None, "--by", help="Metric column(s) to show, a,b (default: every metric of the table)."),
    k: Optional[int] = typer.Option(None, "--k", help="Hardest / easiest thumbnails per class and metric" + d("k", ReportConfig) + "."),
    max_classes: Optional[int] = typer.Option(None, "--max-classes", help="Classes with thumbnail grids per metric; above, the "
                                              "classes with the highest median score" + d("max_classes", ReportConfig) + "."),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Directory to write index.html and its files into (default {DEFAULT_REPORT})."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """Write an HTML report of a score table: distributions, hardest/easiest images per class, label-noise suspects, duplicates."""
    from ..errors import ConfigError
    from ..report import build_report

    check_out(out, "dir")
    if scores is None and not os.path.exists(DEFAULT_SCORES):
        raise ConfigError(f"{DEFAULT_SCORES}: no such directory (run `dataprune score DATA --metric el2n` here first, or pass SCORES)")
    names = tuple(m.strip() for m in by.split(",") if m.strip()) if by is not None else None
    cfg = from_options(ReportConfig, scores=scores, out=None if out is None else str(out),
                       manifest=None if manifest is None else str(manifest), curve=None if curve is None else str(curve),
                       by=names, k=k, max_classes=max_classes)
    r = build_report(cfg)
    if as_json:
        render.print_json(r)
        return
    for n in r["notes"]:
        render.console().print(f"note: {n}", markup=False, highlight=False)
    th = r["thumbnails"]
    render.console().print(f"report: {r['rows']:,} rows, {len(r['metrics'])} metric(s), {th['made']}/{th['wanted']} thumbnails "
                           f"in {r['seconds']:.1f}s", markup=False, highlight=False)
    next_step(r["index"], f"open {shell_path(r['index'])} in a browser")
