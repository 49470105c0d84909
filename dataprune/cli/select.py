"""`dataprune select`: keep part of a scored dataset, as a manifest for `export`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

import typer

from .. import render
from ..config import DEFAULT_MANIFEST, DEFAULT_SCORES, SelectConfig, from_options
from ..errors import ConfigError
from .app import command
from .options import check_out, d, reads_data


def parse_size(text: str, name: str = "--memory-limit") -> int:
    """Bytes from ``2GB``, ``500MB``, ``1.5GiB``, ``64k`` or a plain number (decimal units; *iB binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{name} takes a size like 2GB, 500MB or 1.5GiB, not {text!r}")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** "_kmgt".index(m.group(2).lower() or "_"))


@command
@reads_data
def select(
    scores: Optional[List[str]] = typer.Argument(None, metavar="SCORES", help="Score tables (directories) and/or foreign score files (CSV/TSV/"
                                                 f"parquet with sample_id, or key [+ shard]). Default: {DEFAULT_SCORES}."),
    by: Optional[str] = typer.Option(None, "--by", help="Metric column (higher = harder); a,b combines metrics by mean rank. "
                                     "Default: the only metric of the inputs."),
    keep: Optional[str] = typer.Option(None, "--keep", help="hard (highest scores; default) | easy (lowest) | random (seeded)."),
    frac: Optional[float] = typer.Option(None, "--frac", help="Fraction of the selectable rows to keep, in (0, 1]."),
    count: Optional[int] = typer.Option(None, "--count", help="Number of rows to keep (instead of --frac)."),
    out: Path = typer.Option(Path(DEFAULT_MANIFEST), "--out", help="Manifest to write (where `export` looks)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="plain (--keep; default) | ccs (coverage-centric coreset selection)."),
    class_balanced: bool = typer.Option(False, "--class-balanced", help="Per-class quotas summing exactly to the budget."),
    class_quota: Optional[str] = typer.Option(None, "--class-quota", help="proportional (to class size; default) | equal."),
    ccs_beta: Optional[float] = typer.Option(None, "--ccs-beta", help="CCS: first drop this hardest fraction (likely mislabeled)"
                                             + d("ccs_beta", SelectConfig) + "."),
    ccs_strata: Optional[int] = typer.Option(None, "--ccs-strata", help="CCS: number of equal-width score strata" + d("ccs_strata", SelectConfig) + "."),
    drop_hardest: Optional[float] = typer.Option(None, "--drop-hardest", help="First drop this hardest fraction (sliding window)."),
    dedup: bool = typer.Option(False, "--dedup", help="Leave out rows a dedup table flags as duplicates (before --frac)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Leave out rows scoring below this."),
    max_score: Optional[float] = typer.Option(None, "--max-score", help="Leave out rows scoring above this."),
    nan: Optional[str] = typer.Option(None, "--nan", help="Rows without a score: error (default) | drop."),
    join: Optional[str] = typer.Option(None, "--join", help="Rows missing from an input: inner (left out, counted; default) | "
                                       "strict (error)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random choice and tie breaking hash (sample_id, seed)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset that foreign score files belong to (gives locations)."),
    direction: Optional[str] = typer.Option(None, "--direction", help="Foreign score files: higher-is-harder (default) | "
                                            "higher-is-easier (negated on reading); FILE:easier or FILE:harder sets one file's."),
    expect_rows: Optional[int] = typer.Option(None, "--expect-rows", help="Rows each foreign score file must have (0: any; "
                                              "default: 1,281,167 for ImageNet-1K_*.csv, else any)."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help="Select out of core (in passes over the table, "
                                               "same manifest) when the in-memory choice would need more, e.g. 2GB, 500MB. "
                                               "Default: half the RAM."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan/summary as JSON."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Keep the hard / easy / random part of a scored dataset (class-balanced, CCS, dedup-aware) as a manifest for `export`."""
    from ..select import run_select

    check_out(out, "file")
    paths = list(scores or [DEFAULT_SCORES])
    if not scores and not os.path.exists(DEFAULT_SCORES):
        raise ConfigError(f"{DEFAULT_SCORES}: no such directory (run `dataprune score DATA --metric el2n` here first, "
                          "or pass score tables / score files)")
    names = tuple(m.strip() for m in by.split(",")) if by else None
    cfg = from_options(SelectConfig, by=names, keep=keep, frac=frac, count=count, strategy=strategy, class_balanced=class_balanced,
                       class_quota=class_quota, ccs_beta=ccs_beta, ccs_strata=ccs_strata, drop_hardest=drop_hardest,
                       dedup=dedup, min_score=min_score, max_score=max_score, nan=nan, join=join, seed=seed,
                       direction=direction, expect_rows=expect_rows,
                       memory_limit=parse_size(memory_limit) if memory_limit is not None else None)
    r = run_select(paths, cfg, str(out), data=data, format=format, dry_run=dry_run,
                   source_options=source_options)
    if as_json:
        render.print_json(r)
    else:
        render.select(r, default_out=(out == Path(DEFAULT_MANIFEST)))
