"""The commands that read and write datasets without a model: demo, info, manifest, export."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from .. import render
from ..config import DEFAULT_EXPORT, DEFAULT_MANIFEST, DEFAULT_WORKDIR, ExportConfig, default, from_options
from .app import command, next_step
from .options import DATA_HELP, check_out, jobs_option, on_error_option, reads_data, shell_path

@command
def demo(
    out: Path = typer.Argument(Path("demo-data"), metavar="OUT", help="Directory to write the demo shards into (default demo-data)."),
    samples: int = typer.Option(1000, "--samples", help="Number of images."),
    shard_size: int = typer.Option(250, "--shard-size", help="Samples per shard."),
    label_noise: float = typer.Option(0.0, "--label-noise", help="Fraction of labels to flip (listed in flipped.txt)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shapes, colours and flipped labels."),
):
    """Write the built-in demo dataset (10 classes of coloured shapes, WebDataset shards)."""
    from ..demo import make_demo
    from ..errors import ConfigError

    if samples < 1 or shard_size < 1 or not 0 <= label_noise < 1:
        raise ConfigError("--samples and --shard-size must be positive and --label-noise in [0, 1)")
    check_out(out, "dir", "OUT")
    r = make_demo(str(out), n=samples, shard_size=shard_size, label_noise=label_noise, seed=seed)
    next_step(f"wrote {r['samples']} samples in {r['shards']} shards to {out}/",
              f"dataprune score {shell_path(str(out))} --metric el2n")


@command
@reads_data
def info(
    data: str = typer.Argument(..., metavar="DATA", help=DATA_HELP),
    check: bool = typer.Option(False, "--check", help="Decode every image and count problems by reason."),
    strict: bool = typer.Option(False, "--strict", help="Exit non-zero (6) if any problem is found."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON (for CI jobs)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Decode limit against decompression bombs."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Describe a dataset: format, shards, samples, classes, bytes; with --check, decode everything."""
    from ..errors import CheckFailed
    from ..info import dataset_info
    from ..progress import progress_bar

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
    if not as_json:
        text = (r["ok"] and r["documents"] == r["ok"]) or (not r["ok"] and r["unread_documents"])
        metric = "text-dedup" if text else "el2n"  # score's text metrics read a tar's documents by themselves
        next_step(f"{r['samples']} samples in {r['shards']} shard(s)", f"dataprune score {shell_path(data)} --metric {metric}")


@command
@reads_data
def manifest(
    data: str = typer.Argument(..., metavar="DATA", help="Dataset to list."),
    out: Path = typer.Option(Path(DEFAULT_MANIFEST), "--out", help="Manifest file to write."),
    keys: Optional[str] = typer.Option(None, "--keys", help="CSV/parquet with sample_id, or key (+ shard): keep only these."),
    on_error: str = on_error_option(),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0, not 8, when samples were left out."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Make a manifest straight from a dataset (all samples, or the keys you list), for `export`."""
    from ..manifest import build_manifest, check_complete

    check_out(out, "file")
    r = build_manifest(data, str(out), format=format, keys=keys, on_error=on_error,
                       source_options=source_options, allow_missing=True)
    render.manifest(r, out)
    nxt = "dataprune export --to wds" if out == Path(DEFAULT_MANIFEST) else f"dataprune export {shell_path(str(out))} --to wds"
    next_step(f"manifest {out}", nxt)
    check_complete(r, str(out), allow_missing)  # samples left out: exit 8, after the manifest and its summary


@command
@reads_data
def export(
    manifest: str = typer.Argument(DEFAULT_MANIFEST, metavar="MANIFEST|DATA",
                                   help=f"Manifest from `select`/`manifest` (default {DEFAULT_MANIFEST}), or a dataset path to convert whole."),
    to: Optional[str] = typer.Option(None, "--to", help="wds (default; also: webdataset) | parquet | folder | list | jsonl (text)"),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Output directory (default {DEFAULT_EXPORT})."),
    shard_size: Optional[int] = typer.Option(None, "--shard-size", help="Samples per output shard/file (default: enough shards "
                                             "for a parallel loader, at most 10000 samples each)."),
    max_shard_bytes: Optional[int] = typer.Option(None, "--max-shard-bytes", help="Also cut WebDataset shards at this size."),
    shuffle: bool = typer.Option(False, "--shuffle", help="Seeded shuffle of the output order."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of --shuffle."),
    prefix: Optional[str] = typer.Option(None, "--prefix", help=f"WebDataset shard name prefix (default {default(ExportConfig, 'prefix')})."),
    on_error: Optional[str] = on_error_option(),
    jobs: str = typer.Option("auto", "--jobs", help="Processes writing shards side by side (wds, parquet): a number, or auto "
                             "(default: one per 64 MB of selected samples, at most one per usable CPU — affinity and cgroup quota — and 8; "
                             "a whole dataset: 1). "
                             "The output is the same bytes for any number; under torchrun the ranks do it."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds a torchrun rank (or --jobs' parent) waits for "
                                            f"the others at one step before it gives up (default {default(ExportConfig, 'timeout'):g})."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a --out holding other files (kept unless at our names)."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Exit 0, not 8, when samples were left out."),
    as_json: bool = typer.Option(False, "--json", help="Print the export index as JSON."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Write the kept samples as WebDataset shards, HF parquet, an image folder or a key list (bytes copied unchanged)."""
    from ..errors import ConfigError
    from ..export import check_complete, export as run_export
    from ..progress import progress_bar

    if not os.path.exists(manifest) and "{" not in manifest and "://" not in manifest:
        hint = " (run `dataprune select` first, or pass a manifest or dataset path)" if manifest.startswith(DEFAULT_WORKDIR) else ""
        raise ConfigError(f"{manifest}: no such file or directory{hint}")
    check_out(out, "dir")
    cfg = from_options(ExportConfig, to=to, out=None if out is None else str(out), shard_size=shard_size,
                       max_shard_bytes=max_shard_bytes, shuffle=shuffle, seed=seed, on_error=on_error, prefix=prefix,
                       jobs=jobs_option(jobs), timeout=timeout)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports
    with progress_bar("export", unit="samples", enabled=not as_json and not quiet) as bar:
        r = run_export(manifest, cfg, format=format, progress=lambda n, b: bar.advance(n),
                       source_options=source_options, overwrite=overwrite, allow_missing=True)
    if quiet:
        check_complete(r, cfg.out, allow_missing)
        return
    if as_json:
        render.print_json(r)
    else:
        render.export(r, cfg.out, cfg.to)
        for note in r.get("notes", []):
            typer.echo(f"note: {note}", err=True)
        next_step(f"{cfg.out}/", render.export_next(r, cfg.out, cfg.to))
    check_complete(r, cfg.out, allow_missing)  # samples left out: exit 8, after the export and its summary
