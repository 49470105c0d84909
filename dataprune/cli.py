"""The `dataprune` command line. Thin: parse options, call one library function, render the result.

Heavy libraries (torch, timm) are imported only inside the commands that need them, so `info`,
`select` and `export` start fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from .errors import DataPruneError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make image training sets smaller and better: score examples, select a subset, export it.",
)

DEFAULT_WORKDIR = "dataprune-out"


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


def _source_options(image_column, label_column, key_column, shard_files) -> dict[str, Any]:
    return {"image_column": image_column, "label_column": label_column, "key_column": key_column, "shard_files": shard_files}


FormatOpt = typer.Option(None, "--format", help="wds | folder | parquet (default: detected from the path).")
ImageColOpt = typer.Option(None, "--image-column", help="Parquet: column holding image bytes (default: image, img, jpg, ...).")
LabelColOpt = typer.Option(None, "--label-column", help="Parquet: label column (default: label, labels, cls).")
KeyColOpt = typer.Option(None, "--key-column", help="Parquet: key column (default: key, __key__, id; else the row number).")
ShardFilesOpt = typer.Option(None, "--shard-files", help="Image folders: files per virtual shard (default 10000).")
OnErrorOpt = typer.Option("skip", "--on-error", help="Per-sample problems: skip (counted by reason) or raise.")


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


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
    _console().print(f"wrote {r['samples']} samples in {r['shards']} shards to {out}/")


@command
def info(
    data: str = typer.Argument(..., help="Dataset: tar shards (dir, file, brace pattern, list file), image folder or parquet."),
    format: Optional[str] = FormatOpt,
    check: bool = typer.Option(False, "--check", help="Decode every image and count problems by reason."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero (6) if any problem is found."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON (for CI jobs)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Decode limit against decompression bombs."),
    image_column: Optional[str] = ImageColOpt,
    label_column: Optional[str] = LabelColOpt,
    key_column: Optional[str] = KeyColOpt,
    shard_files: Optional[int] = ShardFilesOpt,
):
    """Describe a dataset: format, shards, samples, classes, bytes; with --check, decode everything."""
    from .errors import CheckFailed
    from .info import dataset_info
    from .progress import progress_bar

    with progress_bar("info", unit="samples", enabled=not as_json) as bar:
        r = dataset_info(data, format=format, source_options=_source_options(image_column, label_column, key_column, shard_files),
                         check=check, max_pixels=max_pixels, progress=bar.advance)
    if as_json:
        _print_json(r)
    else:
        _render_info(r)
    if strict and (r["skipped"] or r["shard_errors"]):
        found = [f"{k}={v}" for k, v in r["problems"].items()] + [f"damaged shard {e['shard']} ({e['reason']})" for e in r["shard_errors"]]
        raise CheckFailed(f"{r['skipped'] + len(r['shard_errors'])} problem(s) found: " + ", ".join(found))


def _render_info(r: dict) -> None:
    from rich.table import Table

    c = _console()
    t = Table(title=f"{r['path']}", show_header=False)
    t.add_row("format", r["format"])
    t.add_row("shards", str(r["shards"]))
    t.add_row("samples", f"{r['samples']} ({r['ok']} ok, {r['skipped']} with problems)")
    t.add_row("bytes", _human(r["bytes"]))
    t.add_row("classes", str(len(r["classes"])) + (f" (+{r['unlabelled']} unlabelled)" if r["unlabelled"] else ""))
    t.add_row("decoded", "every image" if r["checked"] else "no (use --check)")
    c.print(t)
    if r["classes"]:
        ct = Table("label", "name", "count", title="classes")
        for row in r["classes"][:50]:
            ct.add_row(str(row["label"]), row["name"] or "", str(row["count"]))
        if len(r["classes"]) > 50:
            ct.add_row("…", f"{len(r['classes']) - 50} more", "")
        c.print(ct)
    if r["problems"]:
        pt = Table("reason", "count", title="problems")
        for k, v in r["problems"].items():
            pt.add_row(k, str(v))
        c.print(pt)
    if r["problems"] or r.get("shard_errors"):
        from rich.markup import escape

        for e in [s["error"] for s in r.get("shard_errors", [])][:5] + r["problem_examples"][:5]:
            c.print(f"  [dim]{escape(e)}[/]", markup=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


@command
def manifest(
    data: str = typer.Argument(..., help="Dataset to list."),
    out: Path = typer.Option(Path(DEFAULT_WORKDIR) / "manifest.parquet", "--out", help="Manifest file to write."),
    keys: Optional[str] = typer.Option(None, "--keys", help="CSV/parquet with sample_id, or key (+ shard): keep only these."),
    format: Optional[str] = FormatOpt,
    on_error: str = OnErrorOpt,
    image_column: Optional[str] = ImageColOpt,
    label_column: Optional[str] = LabelColOpt,
    key_column: Optional[str] = KeyColOpt,
    shard_files: Optional[int] = ShardFilesOpt,
):
    """Make a manifest straight from a dataset (all samples, or the keys you list), for `export`."""
    from .manifest import build_manifest

    r = build_manifest(data, str(out), format=format, keys=keys, on_error=on_error,
                       source_options=_source_options(image_column, label_column, key_column, shard_files))
    msg = f"wrote {r['rows']} rows to {out}"
    if r["keys_missing"]:
        msg += f" ({r['keys_missing']} listed keys not found)"
    if r["skipped"]:
        msg += " · skipped " + ", ".join(f"{k}={v}" for k, v in r["skipped"].items())
    if r.get("shard_errors"):
        msg += f" · {len(r['shard_errors'])} damaged shard(s): " + "; ".join(e["error"] for e in r["shard_errors"][:3])
    _console().print(msg, markup=False)


@command
def export(
    manifest: str = typer.Argument(str(Path(DEFAULT_WORKDIR) / "manifest.parquet"),
                                   help="Manifest from `select`/`manifest`, or a dataset path to convert whole."),
    to: str = typer.Option("wds", "--to", help="wds | parquet | folder | list"),
    out: Path = typer.Option(Path(DEFAULT_WORKDIR) / "export", "--out", help="Output directory."),
    shard_size: int = typer.Option(10_000, "--shard-size", help="Samples per output shard/file."),
    max_shard_bytes: Optional[int] = typer.Option(None, "--max-shard-bytes", help="Also cut WebDataset shards at this size."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Seeded shuffle of the output order."),
    seed: int = typer.Option(0, "--seed"),
    prefix: str = typer.Option("pruned", "--prefix", help="WebDataset shard name prefix."),
    on_error: str = OnErrorOpt,
    format: Optional[str] = FormatOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the export index as JSON."),
    image_column: Optional[str] = ImageColOpt,
    label_column: Optional[str] = LabelColOpt,
    key_column: Optional[str] = KeyColOpt,
    shard_files: Optional[int] = ShardFilesOpt,
):
    """Write the kept samples as WebDataset shards, HF parquet, an image folder or a key list (bytes copied unchanged)."""
    from .errors import ConfigError
    from .export import ExportConfig
    from .export import export as run_export
    from .progress import progress_bar

    if not os.path.exists(manifest) and "{" not in manifest and "://" not in manifest:
        hint = " (run `dataprune select` first, or pass a manifest or dataset path)" if manifest.startswith(DEFAULT_WORKDIR) else ""
        raise ConfigError(f"{manifest}: no such file or directory{hint}")
    cfg = ExportConfig(to=to, out=str(out), shard_size=shard_size, max_shard_bytes=max_shard_bytes, shuffle=shuffle, seed=seed,
                       on_error=on_error, prefix=prefix)
    with progress_bar("export", unit="samples", enabled=not as_json) as bar:
        r = run_export(manifest, cfg, format=format, progress=lambda n, b: bar.advance(n),
                       source_options=_source_options(image_column, label_column, key_column, shard_files))
    if as_json:
        _print_json(r)
        return
    secs = r["seconds"]["total"]
    msg = (f"exported {r['samples']} samples ({_human(r['bytes'])}) to {out}/ as {to}: {len(r['files'])} file(s), "
           f"{r['samples'] / max(secs, 1e-9):.0f} samples/s")
    if r["skipped"]:
        msg += " · skipped " + ", ".join(f"{k}={v}" for k, v in r["skipped"].items())
    if r.get("shard_errors"):
        msg += f" · {len(r['shard_errors'])} damaged shard(s): " + "; ".join(e["error"] for e in r["shard_errors"][:3])
    _console().print(msg, markup=False)


@command
def score(
    data: str = typer.Argument(..., help="Dataset: tar shards (dir, file, brace pattern, list file), image folder or parquet."),
    metric: List[str] = typer.Option(["el2n"], "--metric", "-m", help="Metric(s), comma-separated or repeated: el2n, grand, "
                                     "forgetting, aum, loss, margin, entropy, prototypes, class-prototypes, dedup."),
    out: Path = typer.Option(Path(DEFAULT_WORKDIR) / "scores", "--out", help="Score table directory."),
    model: Optional[str] = typer.Option(None, "--model", help="Any timm model name (default resnet18; embedding-only runs "
                                        "without --checkpoint: vit_small_patch16_224.dino, pretrained)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from timm / Hugging Face hub weights (needs network)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help=".safetensors, or .pt/.pth (loaded with weights_only=True)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Default: from class names or the checkpoint's head."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present) | cpu | cuda[:N]."),
    batch_size: int = typer.Option(128, "--batch-size"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader processes that read and decode (default: "
                                          "up to 8 on CUDA; 0 on a CPU with ≤ 4 cores, where the model's threads use every core)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Default: native size for images ≤64 px, else the model's."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Proxy training epochs; 0 = score the given model as is "
                                         "(default: 10 when a metric needs a trained model and none is given, else 0)."),
    score_epoch: Optional[int] = typer.Option(None, "--score-epoch", help="Epoch whose model el2n/loss/margin/entropy use (default: last)."),
    runs: int = typer.Option(1, "--runs", help="Independent training runs (seeds); ≥2 adds <metric>_std and a reliability figure."),
    lr: float = typer.Option(0.1, "--lr"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine | step"),
    shuffle_buffer: int = typer.Option(2000, "--shuffle-buffer", help="Samples per worker in the training shuffle buffer."),
    grand_params: str = typer.Option("all", "--grand-params", help="all | head (fast last-layer GraNd)."),
    seed: int = typer.Option(0, "--seed"),
    on_error: str = OnErrorOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a table made with other parameters or data."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Decode limit against decompression bombs."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="k-means k for prototypes/dedup (default: number of classes, "
                                           "else round(sqrt(N/2)))."),
    kmeans_iters: int = typer.Option(20, "--kmeans-iters"),
    kmeans_sample: Optional[int] = typer.Option(200_000, "--kmeans-sample", help="Fit k-means on at most this many rows (seeded)."),
    kmeans_backend: str = typer.Option("auto", "--kmeans-backend", help="auto (faiss when installed) | torch | faiss"),
    eps: float = typer.Option(0.05, "--eps", help="dedup: cosine similarity ≥ 1 − eps inside a cluster marks duplicates."),
    dedup_keep: str = typer.Option("hard", "--dedup-keep", help="dedup: keeper per group — hard (farthest from its centroid, as "
                                   "SemDeDup) | easy (closest) | random."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Embedding cache (default OUT/_embeddings), shareable."),
    format: Optional[str] = FormatOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
    image_column: Optional[str] = ImageColOpt,
    label_column: Optional[str] = LabelColOpt,
    key_column: Optional[str] = KeyColOpt,
    shard_files: Optional[int] = ShardFilesOpt,
):
    """Score every sample of a dataset; writes one parquet part per shard (resumable)."""
    from .engine import ScoreConfig
    from .engine import score as run_score

    names = tuple(dict.fromkeys(m.strip() for item in metric for m in item.split(",") if m.strip()))
    cfg = ScoreConfig(
        data=data, metrics=names, out=str(out), format=format,
        source_options={k: v for k, v in _source_options(image_column, label_column, key_column, shard_files).items() if v is not None},
        model=model, pretrained=pretrained, checkpoint=checkpoint, num_classes=num_classes, device=device, batch_size=batch_size,
        workers=workers, image_size=image_size, epochs=epochs, score_epoch=score_epoch, runs=runs, lr=lr,
        weight_decay=weight_decay, schedule=schedule, shuffle_buffer=shuffle_buffer, grand_params=grand_params, seed=seed,
        on_error=on_error, max_pixels=max_pixels, overwrite=overwrite, clusters=clusters, kmeans_iters=kmeans_iters,
        kmeans_sample=kmeans_sample, kmeans_backend=kmeans_backend, dedup_eps=eps, dedup_keep=dedup_keep, cache_dir=cache_dir,
    )
    from .progress import score_reporter

    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports
    with score_reporter(enabled=not (as_json or quiet)) as report:
        r = run_score(cfg, on_event=report)
    if quiet:
        return
    if as_json:
        _print_json(r)
        return
    t = r["timings"]
    msg = (f"scored {r['scored']} of {r['seen']} samples ({', '.join(r['metrics'])}) in {r['seconds']:.1f}s → {out}/"
           f"  [wait for data {t['read']:.1f}s · compute {t['compute']:.1f}s · write {t['write']:.1f}s]")
    if r["shards_done_before"]:
        msg += f" · {r['shards_done_before']} shard(s) were already done"
    if r["reasons"]:
        msg += " · skipped " + ", ".join(f"{k}={v}" for k, v in sorted(r["reasons"].items()))
    if r.get("reliability"):
        msg += " · reliability (Spearman, half vs half of runs): " + ", ".join(f"{k}={v}" for k, v in r["reliability"].items())
    _console().print(msg)


@command
def select(
    scores: Optional[List[str]] = typer.Argument(None, help="Score tables (directories) and/or foreign score files (CSV/TSV/"
                                                 "parquet with sample_id, or key [+ shard]). Default: dataprune-out/scores."),
    by: Optional[str] = typer.Option(None, "--by", help="Metric column (higher = harder); a,b combines metrics by mean rank. "
                                     "Default: the only metric of the inputs."),
    keep: Optional[str] = typer.Option(None, "--keep", help="hard (highest scores; default) | easy (lowest) | random (seeded)."),
    frac: Optional[float] = typer.Option(None, "--frac", help="Fraction of the selectable rows to keep, in (0, 1]."),
    count: Optional[int] = typer.Option(None, "--count", help="Number of rows to keep (instead of --frac)."),
    out: Path = typer.Option(Path(DEFAULT_WORKDIR) / "manifest.parquet", "--out", help="Manifest to write (where `export` looks)."),
    strategy: str = typer.Option("plain", "--strategy", help="plain (--keep) | ccs (coverage-centric coreset selection)."),
    class_balanced: bool = typer.Option(False, "--class-balanced", help="Per-class quotas summing exactly to the budget."),
    class_quota: str = typer.Option("proportional", "--class-quota", help="proportional (to class size) | equal."),
    ccs_beta: float = typer.Option(0.0, "--ccs-beta", help="CCS: first drop this hardest fraction (likely mislabeled)."),
    ccs_strata: int = typer.Option(50, "--ccs-strata", help="CCS: number of equal-width score strata."),
    drop_hardest: float = typer.Option(0.0, "--drop-hardest", help="First drop this hardest fraction (sliding window)."),
    dedup: bool = typer.Option(False, "--dedup", help="Leave out rows a dedup table flags as duplicates (before --frac)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Leave out rows scoring below this."),
    max_score: Optional[float] = typer.Option(None, "--max-score", help="Leave out rows scoring above this."),
    nan: str = typer.Option("error", "--nan", help="Rows without a score: error | drop."),
    join: str = typer.Option("inner", "--join", help="Rows missing from an input: inner (left out, counted) | strict (error)."),
    seed: int = typer.Option(0, "--seed", help="Random choice and tie breaking hash (sample_id, seed)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset that foreign score files belong to (gives locations)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan/summary as JSON."),
    format: Optional[str] = FormatOpt,
    image_column: Optional[str] = ImageColOpt,
    label_column: Optional[str] = LabelColOpt,
    key_column: Optional[str] = KeyColOpt,
    shard_files: Optional[int] = ShardFilesOpt,
):
    """Keep the hard / easy / random part of a scored dataset (class-balanced, CCS, dedup-aware) as a manifest for `export`."""
    from .errors import ConfigError
    from .select import SelectConfig, run_select

    default_in = str(Path(DEFAULT_WORKDIR) / "scores")
    paths = list(scores or [default_in])
    if not scores and not os.path.exists(default_in):
        raise ConfigError(f"{default_in}: no such directory (run `dataprune score DATA --metric el2n` here first, "
                          "or pass score tables / score files)")
    names = tuple(m.strip() for m in by.split(",")) if by else ()
    cfg = SelectConfig(by=names, keep=keep, frac=frac, count=count, strategy=strategy, class_balanced=class_balanced,
                       class_quota=class_quota, ccs_beta=ccs_beta, ccs_strata=ccs_strata, drop_hardest=drop_hardest,
                       dedup=dedup, min_score=min_score, max_score=max_score, nan=nan, join=join, seed=seed)
    r = run_select(paths, cfg, str(out), data=data, format=format, dry_run=dry_run,
                   source_options=_source_options(image_column, label_column, key_column, shard_files))
    if as_json:
        _print_json(r)
    else:
        _render_select(r, default_out=(out == Path(DEFAULT_WORKDIR) / "manifest.parquet"))


def _render_select(r: dict, default_out: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    c, s, cfg = _console(), r["summary"], r["config"]
    c.print("inputs: " + ", ".join(f"{escape(i['path'])} ({i['kind']})" for i in r["inputs"]) + f" · {s['rows']:,} rows")
    parts = s.get("parts")
    if parts and parts["shards"] > parts["finished"]:
        c.print(f"[yellow]note:[/] the score table is unfinished: {parts['finished']} of {parts['shards']} shards scored")
    for j in s["joins"]:
        if j["missing"] or j["extra"]:
            c.print(f"[yellow]join:[/] {escape(j['input'])} (on {j['on']}): {j['missing']:,} selectable rows have no row there, "
                    f"{j['extra']:,} of its {j['rows']:,} rows are not in the table")
    left = ", ".join(f"{escape(k)}={v:,}" for k, v in s["excluded"].items())
    c.print(f"candidates: {s['candidates']:,}" + (f" (left out: {left})" if left else ""))
    how = "ccs" if cfg["strategy"] == "ccs" else f"keep {cfg['keep']}"
    if cfg["strategy"] == "ccs":
        how += f" ({cfg['ccs_strata']} strata, β={cfg['ccs_beta']})"
    if s["by"]:
        how += f" by {s['score']}" + (f" (mean rank of {', '.join(s['by'])})" if len(s["by"]) > 1 else "")
    if cfg["class_balanced"]:
        how += f", class-balanced ({cfg['class_quota']})"
    if s["dropped_hardest"]:
        how += f", hardest {s['dropped_hardest']:,} dropped first"
    pct = 100.0 * s["kept"] / max(s["candidates"], 1)
    c.print(f"selection: {how} → keep {s['kept']:,} of {s['candidates']:,} ({pct:.1f}%)")
    if s.get("score_range"):
        (a, b), (ka, kb) = s["score_range"]["candidates"], s["score_range"]["kept"]
        c.print(f"score kept: [{ka:.4g}, {kb:.4g}] of [{a:.4g}, {b:.4g}]")
    pc_ = s.get("per_class")
    if pc_ and len(pc_["label"]) > 1:
        t = Table("label", "class", "rows", "kept", "dropped", "kept %", "kept scores", title="per class")
        shown = 20
        for i in range(min(shown, len(pc_["label"]))):
            n, k = pc_["candidates"][i], pc_["kept"][i]
            rng = ""
            if pc_.get("kept_min") and pc_["kept_min"][i] is not None:
                rng = f"{pc_['kept_min'][i]:.4g} … {pc_['kept_max'][i]:.4g}"
            lab = "-" if pc_["label"][i] is None else str(pc_["label"][i])
            t.add_row(lab, escape(pc_["name"][i] or ""), f"{n:,}", f"{k:,}", f"{n - k:,}", f"{100.0 * k / n:.1f}", rng)
        if len(pc_["label"]) > shown:
            t.add_row("…", f"{len(pc_['label']) - shown} more (--json)", "", "", "", "", "")
        c.print(t)
    if s.get("strata"):
        t = Table("stratum", "scores", "rows", "kept", "kept %", title="CCS strata")
        for st in s["strata"]:
            rng = f"{st['lo']:.4g} … {st['hi']:.4g}" if "lo" in st else ""
            frac = "" if st["fraction"] is None else f"{100.0 * st['fraction']:.1f}"
            t.add_row(str(st["stratum"]), rng, f"{st['rows']:,}", f"{st['kept']:,}", frac)
        c.print(t)
    if r["dry_run"]:
        c.print("dry run: nothing written")
    else:
        nxt = "dataprune export" if default_out else f"dataprune export {r['out']}"
        c.print(f"wrote {s['kept']:,} rows to {escape(r['out'])} in {r['seconds']:.1f}s · next: {escape(nxt)}")


@command
def curve(
    train: str = typer.Argument(..., help="Training dataset (the one the scores were made from)."),
    scores: str = typer.Option(str(Path(DEFAULT_WORKDIR) / "scores"), "--scores", help="Score table of TRAIN."),
    test: str = typer.Option(..., "--test", help="Test dataset to evaluate on."),
    fracs: str = typer.Option("1.0,0.8,0.6,0.4,0.2,0.1", "--fracs", help="Kept fractions, comma-separated."),
    keep: str = typer.Option("hard,easy,random,ccs", "--keep", help="Strategies, comma-separated: hard, easy, random, ccs."),
    by: Optional[str] = typer.Option(None, "--by", help="Metric column (default: the table's only metric)."),
    model: Optional[str] = typer.Option(None, "--model", help="timm model trained on each subset (default resnet18)."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs at fraction 1.0 (fraction f trains epochs / f unless --same-epochs)."),
    same_epochs: bool = typer.Option(False, "--same-epochs", help="Same epochs for every fraction (fewer steps when pruned)."),
    repeats: int = typer.Option(1, "--repeats", help="Independent seeds per (strategy, fraction)."),
    ccs_beta: float = typer.Option(0.1, "--ccs-beta", help="CCS: fraction of the hardest rows dropped first."),
    class_balanced: bool = typer.Option(False, "--class-balanced"),
    out: Path = typer.Option(Path(DEFAULT_WORKDIR) / "curve", "--out"),
    batch_size: int = typer.Option(128, "--batch-size"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decode processes (default as for `score`)."),
    lr: float = typer.Option(0.1, "--lr"),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    device: str = typer.Option("auto", "--device"),
    image_size: Optional[int] = typer.Option(None, "--image-size"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh when OUT holds runs made with other settings."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Measure the pruning curve: train on each selected subset, evaluate on TEST, plot error vs fraction kept."""
    from .curve import CurveConfig, run_curve
    from .errors import ConfigError
    from .progress import score_reporter

    try:
        fr = tuple(float(x) for x in fracs.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--fracs must be numbers separated by commas, not {fracs!r}") from None
    cfg = CurveConfig(train=train, scores=scores, test=test, fracs=fr, keeps=tuple(k.strip() for k in keep.split(",") if k.strip()),
                      by=by, repeats=repeats, out=str(out), same_epochs=same_epochs, ccs_beta=ccs_beta, class_balanced=class_balanced,
                      overwrite=overwrite,
                      score={"model": model, "epochs": epochs, "batch_size": batch_size, "workers": workers, "lr": lr,
                             "weight_decay": weight_decay, "device": device, "image_size": image_size, "seed": seed})
    with score_reporter(enabled=not as_json) as report:
        r = run_curve(cfg, emit=report)
    if as_json:
        _print_json(r)
        return
    from rich.table import Table

    t = Table("strategy", "fraction", "repeat", "kept", "epochs", "test error", "train s", title=f"pruning curve → {out}/curve.csv")
    for d in r["results"]:
        t.add_row(d["strategy"], f"{d['fraction']:g}", str(d["repeat"]), str(d["kept"]), str(d["epochs"]),
                  f"{100 * d['test_error']:.2f}%", f"{d['train_seconds']:.0f}")
    _console().print(t)
    if r["plot"]:
        _console().print(f"plot: {r['plot']}")


def main() -> None:
    import signal

    from .errors import request_stop

    # SIGTERM takes the same clean path as Ctrl-C: temp files removed, finished parts kept
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    app()


if __name__ == "__main__":
    main()
