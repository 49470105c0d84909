"""The `dataprune` command line. Thin: parse options, call one library function, render the result.

Heavy libraries (torch, timm) are imported only inside the commands that need them, so `info`,
`select` and `export` start fast.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, List, Optional

import typer

from . import render
from .config import (DEFAULT_CURVE, DEFAULT_EXPORT, DEFAULT_MANIFEST, DEFAULT_SCORES, DEFAULT_WORKDIR, CurveConfig, ExportConfig,
                     ScoreConfig, SelectConfig, default, from_options)
from .errors import DataPruneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make image training sets smaller and better: score examples, select a subset, export it.",
)

def _err(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {msg}", markup=True)


def command(fn: Callable) -> Callable:
    """Turn DataPruneError into one red line and its exit code; Ctrl-C into exit 130; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DataPruneError as e:
            _err(str(e).replace("[", "\\["))
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:
            _err("interrupted; finished parts are kept and a rerun resumes")
            raise typer.Exit(130)
        except BrokenPipeError:
            raise typer.Exit(0)
        except OSError as e:  # disk full, permission denied, ...: the environment, not a bug
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _err(f"{where}{e.strerror or e}".replace("[", "\\["))
            raise typer.Exit(1)

    return app.command()(wrapper)


_SOURCE_OPTIONS = {  # the options of every command that reads a dataset, declared once (see ``reads_data``)
    "format": (Optional[str], typer.Option(None, "--format", help="wds | folder | parquet (default: detected from the path).")),
    "image_column": (Optional[str], typer.Option(None, "--image-column", help="Parquet: column holding image bytes (default: image, "
                                                 "img, jpg, ...).")),
    "label_column": (Optional[str], typer.Option(None, "--label-column", help="Parquet: label column (default: label, labels, cls).")),
    "key_column": (Optional[str], typer.Option(None, "--key-column", help="Parquet: key column (default: key, __key__, id; else "
                                               "the row number).")),
    "shard_files": (Optional[int], typer.Option(None, "--shard-files", help="Image folders: files per virtual shard (default 10000).")),
}


def reads_data(fn: Callable) -> Callable:
    """Give a command the dataset options (``--format``, parquet columns, ``--shard-files``): it
    receives ``format`` and ``source_options`` (a dict of the others) instead."""
    import inspect

    sig = inspect.signature(fn)
    own = [q for q in sig.parameters.values() if q.name not in ("format", "source_options")]
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann) for k, (ann, opt) in _SOURCE_OPTIONS.items()]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        fmt = kwargs.pop("format", None)
        opts = {k: v for k in _SOURCE_OPTIONS if k != "format" and (v := kwargs.pop(k, None)) is not None}
        return fn(*args, format=fmt, source_options=opts, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)
    return wrapper


OnErrorOpt = typer.Option(None, "--on-error", help="Per-sample problems: skip (counted by reason; default) or raise.")


@command
def demo(
    out: Path = typer.Argument(Path("demo-data"), help="Directory to write the demo shards into."),
    samples: int = typer.Option(1000, "--samples", help="Number of images."),
    shard_size: int = typer.Option(250, "--shard-size", help="Samples per shard."),
    label_noise: float = typer.Option(0.0, "--label-noise", help="Fraction of labels to flip (listed in flipped.txt)."),
    seed: int = typer.Option(0, "--seed"),
):
    """Write the built-in demo dataset (10 classes of coloured shapes, WebDataset shards)."""
    from .demo import make_demo
    from .errors import ConfigError

    if samples < 1 or shard_size < 1 or not 0 <= label_noise < 1:
        raise ConfigError("--samples and --shard-size must be positive and --label-noise in [0, 1)")
    r = make_demo(str(out), n=samples, shard_size=shard_size, label_noise=label_noise, seed=seed)
    render.console().print(f"wrote {r['samples']} samples in {r['shards']} shards to {out}/")


@command
@reads_data
def info(
    data: str = typer.Argument(..., help="Dataset: tar shards (dir, file, brace pattern, list file), image folder or parquet."),
    check: bool = typer.Option(False, "--check", help="Decode every image and count problems by reason."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero (6) if any problem is found."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON (for CI jobs)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Decode limit against decompression bombs."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Describe a dataset: format, shards, samples, classes, bytes; with --check, decode everything."""
    from .errors import CheckFailed
    from .info import dataset_info
    from .progress import progress_bar

    with progress_bar("info", unit="samples", enabled=not as_json) as bar:
        r = dataset_info(data, format=format, source_options=source_options,
                         check=check, max_pixels=max_pixels, progress=bar.advance)
    if as_json:
        render.print_json(r)
    else:
        render.info(r)
    if strict and (r["skipped"] or r["shard_errors"]):
        found = [f"{k}={v}" for k, v in r["problems"].items()] + [f"damaged shard {e['shard']} ({e['reason']})" for e in r["shard_errors"]]
        raise CheckFailed(f"{r['skipped'] + len(r['shard_errors'])} problem(s) found: " + ", ".join(found))


@command
@reads_data
def manifest(
    data: str = typer.Argument(..., help="Dataset to list."),
    out: Path = typer.Option(Path(DEFAULT_MANIFEST), "--out", help="Manifest file to write."),
    keys: Optional[str] = typer.Option(None, "--keys", help="CSV/parquet with sample_id, or key (+ shard): keep only these."),
    on_error: str = OnErrorOpt,
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0, not 8, when samples were left out."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Make a manifest straight from a dataset (all samples, or the keys you list), for `export`."""
    from .manifest import build_manifest, check_complete

    r = build_manifest(data, str(out), format=format, keys=keys, on_error=on_error,
                       source_options=source_options, allow_missing=True)
    render.manifest(r, out)
    check_complete(r, str(out), allow_missing)  # samples left out: exit 8, after the manifest and its summary


@command
@reads_data
def export(
    manifest: str = typer.Argument(DEFAULT_MANIFEST, help="Manifest from `select`/`manifest`, or a dataset path to convert whole."),
    to: Optional[str] = typer.Option(None, "--to", help="wds (default) | parquet | folder | list"),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Output directory (default {DEFAULT_EXPORT})."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Samples per output shard/file "
                                             f"(default {default(ExportConfig, 'shard_size')})."),
    max_shard_bytes: Optional[int] = typer.Option(None, "--max-shard-bytes", help="Also cut WebDataset shards at this size."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Seeded shuffle of the output order."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    prefix: Optional[str] = typer.Option(None, "--prefix", help=f"WebDataset shard name prefix (default {default(ExportConfig, 'prefix')})."),
    on_error: Optional[str] = OnErrorOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a --out holding other files (kept unless at our names)."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0, not 8, when samples were left out."),
    as_json: bool = typer.Option(False, "--json", help="Print the export index as JSON."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Write the kept samples as WebDataset shards, HF parquet, an image folder or a key list (bytes copied unchanged)."""
    from .errors import ConfigError
    from .export import check_complete, export as run_export
    from .progress import progress_bar

    if not os.path.exists(manifest) and "{" not in manifest and "://" not in manifest:
        hint = " (run `dataprune select` first, or pass a manifest or dataset path)" if manifest.startswith(DEFAULT_WORKDIR) else ""
        raise ConfigError(f"{manifest}: no such file or directory{hint}")
    cfg = from_options(ExportConfig, to=to, out=None if out is None else str(out), shard_size=shard_size,
                       max_shard_bytes=max_shard_bytes, shuffle=shuffle, seed=seed, on_error=on_error, prefix=prefix)
    with progress_bar("export", unit="samples", enabled=not as_json) as bar:
        r = run_export(manifest, cfg, format=format, progress=lambda n, b: bar.advance(n),
                       source_options=source_options, overwrite=overwrite, allow_missing=True)
    if as_json:
        render.print_json(r)
    else:
        render.export(r, cfg.out, cfg.to)
    check_complete(r, cfg.out, allow_missing)  # samples left out: exit 8, after the export and its summary


def _d(name: str, cls=ScoreConfig) -> str:
    """`` (default X)`` for a config field, for help texts."""
    return f" (default {default(cls, name)})"


@command
@reads_data
def score(
    data: str = typer.Argument(..., help="Dataset: tar shards (dir, file, brace pattern, list file), image folder or parquet."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="Metric(s), comma-separated or repeated: el2n "
                                               "(default), grand, forgetting, aum, loss, margin, entropy, prototypes, "
                                               "class-prototypes, dedup."),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Score table directory (default {DEFAULT_SCORES})."),
    model: Optional[str] = typer.Option(None, "--model", help="Any timm model name (default resnet18; embedding-only runs "
                                        "without --checkpoint: vit_small_patch16_224.dino, pretrained)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from timm / Hugging Face hub weights (needs network)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help=".safetensors, or .pt/.pth (loaded with weights_only=True)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Default: from class names or the checkpoint's head."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA when present; default) | cpu | cuda[:N]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per batch" + _d("batch_size") + "."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader processes that read and decode (default: "
                                          "up to 8 on CUDA; 0 on a CPU with ≤ 4 cores, where the model's threads use every core)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Default: native size for images ≤64 px, else the model's."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Proxy training epochs; 0 = score the given model as is "
                                         "(default: 10 when a metric needs a trained model and none is given, else 0)."),
    score_epoch: Optional[int] = typer.Option(None, "--score-epoch", help="Epoch whose model el2n/loss/margin/entropy use (default: last)."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Independent training runs (seeds); ≥2 adds <metric>_std and a "
                                       "reliability figure" + _d("runs") + "."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate" + _d("lr") + "."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay" + _d("weight_decay") + "."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine | step" + _d("schedule") + "."),
    shuffle_buffer: Optional[int] = typer.Option(None, "--shuffle-buffer", help="Samples per worker in the training shuffle "
                                                 "buffer" + _d("shuffle_buffer") + "."),
    grand_params: Optional[str] = typer.Option(None, "--grand-params", help="all | head (fast last-layer GraNd)" + _d("grand_params") + "."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    on_error: Optional[str] = OnErrorOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a table made with other parameters or data."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Decode limit against decompression bombs."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="k-means k for prototypes/dedup (default: number of classes, "
                                           "else round(sqrt(N/2)))."),
    kmeans_iters: Optional[int] = typer.Option(None, "--kmeans-iters", help="Lloyd iterations" + _d("kmeans_iters") + "."),
    kmeans_sample: Optional[int] = typer.Option(None, "--kmeans-sample", help="Fit k-means on at most this many rows (seeded)"
                                                + _d("kmeans_sample") + "."),
    kmeans_backend: Optional[str] = typer.Option(None, "--kmeans-backend", help="auto (faiss when installed; default) | torch | faiss"),
    eps: Optional[float] = typer.Option(None, "--eps", help="dedup: cosine similarity ≥ 1 − eps inside a cluster marks duplicates"
                                        + _d("dedup_eps") + "."),
    dedup_keep: Optional[str] = typer.Option(None, "--dedup-keep", help="dedup: keeper per group — hard (farthest from its centroid, "
                                             "as SemDeDup; default) | easy (closest) | random."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Embedding cache (default OUT/_embeddings), shareable."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Score every sample of a dataset; writes one parquet part per shard (resumable)."""
    from .engine import score as run_score
    from .progress import score_reporter

    names = tuple(dict.fromkeys(m.strip() for item in metric or [] for m in item.split(",") if m.strip())) if metric else None
    cfg = from_options(
        ScoreConfig, data=data, metrics=names, out=None if out is None else str(out), format=format,
        source_options=source_options,
        model=model, pretrained=pretrained, checkpoint=checkpoint, num_classes=num_classes, device=device, batch_size=batch_size,
        workers=workers, image_size=image_size, epochs=epochs, score_epoch=score_epoch, runs=runs, lr=lr,
        weight_decay=weight_decay, schedule=schedule, shuffle_buffer=shuffle_buffer, grand_params=grand_params, seed=seed,
        on_error=on_error, max_pixels=max_pixels, overwrite=overwrite, clusters=clusters, kmeans_iters=kmeans_iters,
        kmeans_sample=kmeans_sample, kmeans_backend=kmeans_backend, dedup_eps=eps, dedup_keep=dedup_keep, cache_dir=cache_dir,
    )
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports
    with score_reporter(enabled=not (as_json or quiet)) as report:
        r = run_score(cfg, on_event=report)
    if not quiet:
        render.print_json(r) if as_json else render.score(r, cfg.out)
    for note in [] if quiet or as_json else r["notes"]:  # e.g. a damaged part scored again
        typer.echo(f"note: {note}", err=True)


@command
@reads_data
def select(
    scores: Optional[List[str]] = typer.Argument(None, help="Score tables (directories) and/or foreign score files (CSV/TSV/"
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
                                             + _d("ccs_beta", SelectConfig) + "."),
    ccs_strata: Optional[int] = typer.Option(None, "--ccs-strata", help="CCS: number of equal-width score strata" + _d("ccs_strata", SelectConfig) + "."),
    drop_hardest: Optional[float] = typer.Option(None, "--drop-hardest", help="First drop this hardest fraction (sliding window)."),
    dedup: bool = typer.Option(False, "--dedup", help="Leave out rows a dedup table flags as duplicates (before --frac)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Leave out rows scoring below this."),
    max_score: Optional[float] = typer.Option(None, "--max-score", help="Leave out rows scoring above this."),
    nan: Optional[str] = typer.Option(None, "--nan", help="Rows without a score: error (default) | drop."),
    join: Optional[str] = typer.Option(None, "--join", help="Rows missing from an input: inner (left out, counted; default) | "
                                       "strict (error)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random choice and tie breaking hash (sample_id, seed)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset that foreign score files belong to (gives locations)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan/summary as JSON."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Keep the hard / easy / random part of a scored dataset (class-balanced, CCS, dedup-aware) as a manifest for `export`."""
    from .errors import ConfigError
    from .select import run_select

    paths = list(scores or [DEFAULT_SCORES])
    if not scores and not os.path.exists(DEFAULT_SCORES):
        raise ConfigError(f"{DEFAULT_SCORES}: no such directory (run `dataprune score DATA --metric el2n` here first, "
                          "or pass score tables / score files)")
    names = tuple(m.strip() for m in by.split(",")) if by else None
    cfg = from_options(SelectConfig, by=names, keep=keep, frac=frac, count=count, strategy=strategy, class_balanced=class_balanced,
                       class_quota=class_quota, ccs_beta=ccs_beta, ccs_strata=ccs_strata, drop_hardest=drop_hardest,
                       dedup=dedup, min_score=min_score, max_score=max_score, nan=nan, join=join, seed=seed)
    r = run_select(paths, cfg, str(out), data=data, format=format, dry_run=dry_run,
                   source_options=source_options)
    if as_json:
        render.print_json(r)
    else:
        render.select(r, default_out=(out == Path(DEFAULT_MANIFEST)))


def _csv(text: Optional[str], cast=str, what: str = "--keep") -> Optional[tuple]:
    from .errors import ConfigError

    if text is None:
        return None
    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{what} must be numbers separated by commas, not {text!r}") from None


@command
def curve(
    train: str = typer.Argument(..., help="Training dataset (the one the scores were made from)."),
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
    class_balanced: bool = typer.Option(False, "--class-balanced"),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Output directory (default {DEFAULT_CURVE})."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per batch" + _d("batch_size") + "."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode processes (default as for `score`)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate" + _d("lr") + "."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay" + _d("weight_decay") + "."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (default) | cpu | cuda[:N]."),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh when OUT holds runs made with other settings."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Measure the pruning curve: train on each selected subset, evaluate on TEST, plot error vs fraction kept."""
    from .curve import run_curve
    from .progress import score_reporter

    train_opts = {"model": model, "batch_size": batch_size, "workers": workers, "lr": lr, "weight_decay": weight_decay,
                  "device": device, "image_size": image_size, "seed": seed}
    cfg = from_options(CurveConfig, train=train, scores=scores, test=test, fracs=_csv(fracs, float, "--fracs"), keeps=_csv(keep),
                       by=by, repeats=repeats, out=None if out is None else str(out), same_epochs=same_epochs, epochs=epochs,
                       ccs_beta=ccs_beta, class_balanced=class_balanced, overwrite=overwrite,
                       score={k: v for k, v in train_opts.items() if v is not None})
    with score_reporter(enabled=not as_json) as report:
        r = run_curve(cfg, emit=report)
    if as_json:
        render.print_json(r)
    else:
        render.curve(r, cfg.out)


def main() -> None:
    import signal

    from .errors import request_stop

    # SIGTERM takes the same clean path as Ctrl-C: temp files removed, finished parts kept
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    app()


if __name__ == "__main__":
    main()
