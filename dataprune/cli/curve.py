"""`dataprune curve`: the pruning curve — train on each selected subset, report test error."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .. import render
from ..config import DEFAULT_CURVE, DEFAULT_SCORES, CurveConfig, default, from_options
from .app import command, next_step
from .options import check_out, csv, d


@command
def curve(
    train: str = typer.Argument(..., metavar="TRAIN", help="Training dataset (the one the scores were made from)."),
    scores: Optional[str] = typer.Option(None, "--scores", help=f"Score table of TRAIN (default {DEFAULT_SCORES})."),
    test: str = typer.Option(..., "--test", help="Test dataset to evaluate on."),
    fracs: Optional[str] = typer.Option(None, "--fracs", help="Kept fractions, comma-separated (default "
                                        + ",".join(map(str, default(CurveConfig, "fracs"))) + ")."),
    keep: Optional[str] = typer.Option(None, "--keep", help="Strategies, comma-separated (default "
                                       + ",".join(default(CurveConfig, "keeps")) + ")."),
    by: Optional[str] = typer.Option(None, "--by", help="Metric column (default: the table's only metric)."),
    model: Optional[str] = typer.Option(None, "--model", help="timm model trained on each subset (default resnet18)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs at fraction 1.0 (fraction f trains epochs / f unless "
                                         f"--same-epochs; default {default(CurveConfig, 'epochs')})."),
    same_epochs: bool = typer.Option(False, "--same-epochs", help="Same epochs for every fraction (fewer steps when pruned)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Independent seeds per (strategy, fraction) (default 1)."),
    ccs_beta: Optional[float] = typer.Option(None, "--ccs-beta", help="CCS: fraction of the hardest rows dropped first "
                                             f"(default {default(CurveConfig, 'ccs_beta')})."),
    class_balanced: bool = typer.Option(False, "--class-balanced", help="Class-balanced selection at every fraction (as select)."),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Output directory (default {DEFAULT_CURVE})."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per batch" + d("batch_size") + "."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode processes (default as for `score`)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate" + d("lr") + "."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay" + d("weight_decay") + "."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default) | cpu | cuda[:N]."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Training/evaluation image size (default as for `score`)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the selections and the training runs" + d("seed") + "."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh when OUT holds runs made with other settings."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Measure the pruning curve: train on each selected subset, evaluate on TEST, plot error vs fraction kept."""
    check_out(out, "dir")
    from ..curve import run_curve
    from ..progress import score_reporter

    train_opts = {"model": model, "batch_size": batch_size, "workers": workers, "lr": lr, "weight_decay": weight_decay,
                  "device": device, "image_size": image_size, "seed": seed}
    cfg = from_options(CurveConfig, train=train, scores=scores, test=test, fracs=csv(fracs, float, "--fracs"), keeps=csv(keep),
                       by=by, repeats=repeats, out=None if out is None else str(out), same_epochs=same_epochs, epochs=epochs,
                       ccs_beta=ccs_beta, class_balanced=class_balanced, overwrite=overwrite,
                       score={k: v for k, v in train_opts.items() if v is not None})
    with score_reporter(enabled=not as_json) as report:
        r = run_curve(cfg, emit=report)
    if as_json:
        render.print_json(r)
    else:
        render.curve(r, cfg.out)
        next_step(f"{cfg.out}/curve.csv" + (f", {r['plot']}" if r.get("plot") else ""),
                  "pick the strategy and fraction with the lowest test error: dataprune select --keep K --frac F")
