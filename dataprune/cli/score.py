"""`dataprune score`: stream a dataset through a model and write a score table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from .. import render
from ..config import DEFAULT_SCORES, ScoreConfig, from_options
from .app import command, next_step
from .options import DATA_HELP, check_out, d, on_error_option, reads_data, shell_path


@command
@reads_data
def score(
    data: str = typer.Argument(..., metavar="DATA", help=DATA_HELP),
    metric: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="Metric(s), comma-separated or repeated: el2n "
                                               "(default), grand, forgetting, aum, loss, margin, entropy, prototypes, "
                                               "class-prototypes, dedup; text corpora: text-dedup, text-substr."),
    out: Optional[Path] = typer.Option(None, "--out", help=f"Score table directory (default {DEFAULT_SCORES})."),
    model: Optional[str] = typer.Option(None, "--model", help="Any timm model name (default resnet18; embedding-only runs "
                                        "without --checkpoint: vit_small_patch16_224.dino, pretrained)."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from timm / Hugging Face hub weights (needs network)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help=".safetensors, or .pt/.pth (loaded with weights_only=True)."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Default: from class names or the checkpoint's head."),
    device: Optional[str] = typer.Option(None, "--device", help="auto (CUDA when present; default) | cpu | cuda[:N]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per batch" + d("batch_size") + "."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader processes that read and decode (default: "
                                          "up to 8 on CUDA; on a CPU with ≤ 4 cores 1 for images ≥ 256 px, else 0 — the model's threads use every core)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Default: native size for images ≤64 px, else the model's."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Proxy training epochs; 0 = score the given model as is "
                                         "(default: 10 when a metric needs a trained model and none is given, else 0)."),
    score_epoch: Optional[int] = typer.Option(None, "--score-epoch", help="Epoch whose model el2n/loss/margin/entropy use (default: last)."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Independent training runs (seeds); ≥2 adds <metric>_std and a "
                                       "reliability figure" + d("runs") + "."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate" + d("lr") + "."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay" + d("weight_decay") + "."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="cosine | step" + d("schedule") + "."),
    shuffle_buffer: Optional[int] = typer.Option(None, "--shuffle-buffer", help="Samples per worker in the training shuffle "
                                                 "buffer" + d("shuffle_buffer") + "."),
    grand_params: Optional[str] = typer.Option(None, "--grand-params", help="all | head (fast last-layer GraNd)" + d("grand_params") + "."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of training, k-means and random choices" + d("seed") + "."),
    on_error: Optional[str] = on_error_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a table made with other parameters or data."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Decode limit against decompression bombs."),
    decode: Optional[str] = typer.Option(None, "--decode", help="Where JPEGs are decoded: auto (on the GPU when the model runs "
                                         "on CUDA; default) | cpu | cuda (batched nvJPEG)."),
    exact_decode: bool = typer.Option(False, "--exact-decode", help="Decode every image at full resolution (by default a "
                                      "large JPEG is decoded at 1/2, 1/4 or 1/8 scale when that still covers the resize)."),
    clusters: Optional[int] = typer.Option(None, "--clusters", help="k-means k for prototypes/dedup (default: number of classes, "
                                           "else round(sqrt(N/2)))."),
    kmeans_iters: Optional[int] = typer.Option(None, "--kmeans-iters", help="Lloyd iterations" + d("kmeans_iters") + "."),
    kmeans_sample: Optional[int] = typer.Option(None, "--kmeans-sample", help="Fit k-means on at most this many rows (seeded)"
                                                + d("kmeans_sample") + "."),
    kmeans_backend: Optional[str] = typer.Option(None, "--kmeans-backend", help="auto (faiss when installed; default) | torch | faiss"),
    eps: Optional[float] = typer.Option(None, "--eps", help="dedup: cosine similarity ≥ 1 − eps inside a cluster marks duplicates"
                                        + d("dedup_eps") + "."),
    dedup_keep: Optional[str] = typer.Option(None, "--dedup-keep", help="dedup: keeper per group — hard (farthest from its centroid, "
                                             "as SemDeDup; default) | easy (closest) | random. text-dedup: first (in corpus "
                                             "order; default) | longest | random."),
    dedup_rule: Optional[str] = typer.Option(None, "--dedup-rule", help="dedup: which near-copies go — greedy (visit in keeper "
                                             "order, drop a row similar to one already kept; default) | semdedup (the paper's "
                                             "rule: drop a row similar to any earlier row) | components (one keeper per "
                                             "connected group)."),
    ngram: Optional[int] = typer.Option(None, "--ngram", help="text-dedup: words per shingle" + d("ngram") + "."),
    num_perm: Optional[int] = typer.Option(None, "--num-perm", help="text-dedup: MinHash permutations" + d("num_perm") + "."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="text-dedup: near copies have estimated Jaccard ≥ this; "
                                              "sets the LSH bands × rows" + d("threshold") + "."),
    min_span: Optional[int] = typer.Option(None, "--min-span", help="text-substr: repeated spans of at least this many "
                                           "whitespace tokens" + d("min_span") + "."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Embedding cache (default OUT/_embeddings), shareable."),
    keep_artifacts: bool = typer.Option(False, "--keep-artifacts", help="Keep the resume checkpoints (OUT/.train/) after a finished "
                                        "run; by default they are deleted when every shard is scored."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
    format: Optional[str] = None,
    source_options: Optional[dict] = None,
):
    """Score every sample of a dataset; writes one parquet part per shard (resumable)."""
    check_out(out, "dir")
    from ..engine import score as run_score
    from ..progress import score_reporter

    names = tuple(dict.fromkeys(m.strip() for item in metric or [] for m in item.split(",") if m.strip())) if metric else None
    cfg = from_options(
        ScoreConfig, data=data, metrics=names, out=None if out is None else str(out), format=format,
        source_options=source_options,
        model=model, pretrained=pretrained, checkpoint=checkpoint, num_classes=num_classes, device=device, batch_size=batch_size,
        workers=workers, image_size=image_size, epochs=epochs, score_epoch=score_epoch, runs=runs, lr=lr,
        weight_decay=weight_decay, schedule=schedule, shuffle_buffer=shuffle_buffer, grand_params=grand_params, seed=seed,
        on_error=on_error, max_pixels=max_pixels, overwrite=overwrite, clusters=clusters, kmeans_iters=kmeans_iters,
        kmeans_sample=kmeans_sample, kmeans_backend=kmeans_backend, dedup_eps=eps, dedup_keep=dedup_keep, dedup_rule=dedup_rule,
        cache_dir=cache_dir, ngram=ngram, num_perm=num_perm, threshold=threshold, min_span=min_span,
        keep_artifacts=keep_artifacts, decode=decode, exact_decode=exact_decode,
    )
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports
    with score_reporter(enabled=not (as_json or quiet)) as report:
        r = run_score(cfg, on_event=report)
    if not quiet:
        render.print_json(r) if as_json else render.score(r, cfg.out)
    if quiet or as_json:
        return
    for note in r["notes"]:  # e.g. a damaged part scored again
        typer.echo(f"note: {note}", err=True)
    default_out = out is None or str(out).rstrip("/") == DEFAULT_SCORES.rstrip("/")
    text = [m for m in r["metrics"] if m in ("text-dedup", "text-substr")]
    nxt = "dataprune select " + ("--dedup --keep random --frac 1" if text == ["text-dedup"] else "--dedup --frac 1"  # no score
                                 if "text-dedup" in text else "--by dup_span_frac --max-score 0.5 --frac 1" if text
                                 else "--keep hard --frac 0.8")
    nxt += "" if default_out else f" {shell_path(cfg.out)}"
    next_step(render.score_where(r, cfg.out), nxt)
