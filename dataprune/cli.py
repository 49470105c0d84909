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
    if strict and r["skipped"]:
        raise CheckFailed(f"{r['skipped']} problem(s) found: " + ", ".join(f"{k}={v}" for k, v in r["problems"].items()))


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
        for e in r["problem_examples"][:5]:
            c.print(f"  [dim]{e}[/]", markup=True)


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
    _console().print(msg)


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
    _console().print(msg)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
