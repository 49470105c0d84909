"""Planning a score run: resolve defaults (model, epochs, workers), validate the options, open the
source, read the model's data config on the meta device, and check the output directory. No heavy work.
Also the names of the run's other files in OUT (checkpoints, proxy weights, embedding cache) and what
a finished run leaves of them (``finish_artifacts``)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from typing import Any

from ..config import ScoreConfig
from ..distributed import local_world_size, usable_cpus
from ..errors import ConfigError, DecodeError, SourceError, TableError
from ..scoretable import read_table_meta, score_table_meta
from .batches import NATIVE_MAX, Preprocess, StreamSpec
from .outdir import (CKPT_DIR, EMBED_DIR, HASH_CACHE, TEXT_DIR, check_out, check_out_location, ckpt_path, embed_root,
                     finish_artifacts, init_out, proxy_path, text_root)

__all__ = ["CKPT_DIR", "EMBED_DIR", "HASH_CACHE", "TEXT_DIR", "check_out", "check_out_location", "ckpt_path", "embed_root",
           "finish_artifacts", "init_out", "proxy_path", "text_root", "Plan", "plan", "resolve_defaults", "auto_workers",
           "any_todo", "describe", "eval_preprocess", "peek_shape", "fixed_input_size"]

DEFAULT_MODEL = "resnet18"
DEFAULT_ENCODER = "vit_small_patch16_224.dino"  # self-supervised DINO ViT-S/16 (timm / HF hub weights)
DEFAULT_EPOCHS = 10
LARGE_PIXELS = 256 * 256  # source images from this size up cost ~1 ms or more to decode (auto_workers)


def resolve_defaults(cfg: ScoreConfig, metrics, source_pixels: int | None = None) -> ScoreConfig:
    """Fill ``model``, ``epochs`` and ``workers`` left as None (workers: see ``auto_workers``;
    ``source_pixels``: the first image's, once the plan has decoded it).

    * model: resnet18 — except for runs with only embedding metrics and neither --checkpoint nor
      --epochs, which use the self-supervised DINO ViT-S/16 with its pretrained weights (the paper's
      prototype metric uses a self-supervised encoder).
    * epochs: 10 when a metric needs training (forgetting, aum) or when model-output metrics
      (el2n, loss, margin, entropy) have no --checkpoint/--pretrained model to score; else 0.
    """
    kinds = {m.kind for m in metrics}
    keep = cfg.dedup_keep or ("first" if "text" in kinds else "hard")  # text-dedup: corpus order; dedup: SemDeDup's
    if kinds == {"text"}:  # no model, no training; the workers do the work while the main process waits
        workers = cfg.workers if cfg.workers is not None else _text_workers()
        return replace(cfg, epochs=0 if cfg.epochs is None else cfg.epochs, workers=workers, dedup_keep=keep)
    epochs = cfg.epochs
    if epochs is None:
        if "train" in kinds or ("eval" in kinds and not cfg.checkpoint):  # --pretrained alone has a new, random head
            epochs = DEFAULT_EPOCHS
        else:
            epochs = 0
    model, pretrained = cfg.model, cfg.pretrained
    if model is None:
        if kinds == {"embed"} and not cfg.checkpoint and epochs == 0:
            model, pretrained = DEFAULT_ENCODER, True
        else:
            model = DEFAULT_MODEL
    workers = cfg.workers
    if workers is None and epochs and not cfg.overwrite:
        workers = _stored_workers(cfg.out)  # resume a training run with the count it started with
    if workers is None:
        from ..models import resolve_device

        workers = auto_workers(resolve_device(cfg.device).type == "cuda", source_pixels)
    return replace(cfg, model=model, pretrained=pretrained, epochs=epochs, workers=workers, dedup_keep=keep)


def _text_workers() -> int:
    """Text metrics: one worker per usable core (of this torchrun rank), at most 8; none on one core."""
    cpus = max(1, usable_cpus() // local_world_size())
    return 0 if cpus == 1 else min(8, cpus)


def _stored_workers(out: str) -> int | None:
    """The worker count an existing training run's table recorded (it shapes the data order, so it is
    part of the fingerprint): a job requeued on a node with other cores resumes instead of stopping."""
    try:
        w = read_table_meta(out).get("config", {}).get("workers")
    except (TableError, OSError, ValueError, AttributeError):
        return None
    return w if isinstance(w, int) and not isinstance(w, bool) and w >= 0 else None


def auto_workers(cuda: bool, source_pixels: int | None = None) -> int:
    """Decode worker processes for ``--workers`` left unset (``source_pixels``: the first image's).

    * CUDA: the GPU computes and the CPU only decodes, so up to 8 workers, one core left for the
      main process.
    * CPU, ≤ 4 cores: the model's intra-op threads already use every core, so a decode worker
      preempts one of them and the whole batch waits for it at the next barrier. That costs more
      than it saves when decoding is nearly free — CIFAR-size images (32 px: 0.83 of the
      forward-only speed with one worker against 0.89 with none, benchmarks/bench_score.py) — so
      small images are decoded in the main process between forwards. Real-size images
      (≥ LARGE_PIXELS, 256²: ~1 ms or more to decode) get one worker on 2–4 cores: in the main
      process the decode is serial with the forward and the other cores idle meanwhile, which caps
      the speed at (c·R + F) / (c·(R + F)) of the shared-core ceiling c·R·F / (c·R + F) (R: decode
      rate per core, F: forward rate on all c cores; 0.83 with the issue's R ≈ 780/s, F ≈ 400/s on 2
      cores). Measured here at 224 px (benchmarks/bench_workers.py --imagenet, resnet18, ImageNet-like
      JPEGs, 2 cores, medians of 3): quiet (load 0.7), F 55/s, R 461/s: 0 workers 0.95, 1 worker 0.97
      (ranges 48–50 vs 50–51/s), 2 workers 0.96; shared with other jobs (load 2–6, F 19/s): 0.90,
      0.91, 0.65 — a slow forward leaves little to win, one worker never lost, two can oversubscribe.
      The count depends only on the cores and the data, never on a timing, because
      it shapes a training run's data order (its fingerprint).
    * CPU, > 4 cores: the cores the model's threads leave free, else one worker per 8 cores (not
      measured here: no such machine).
    Under torchrun the node's cores are divided among its ranks (LOCAL_WORLD_SIZE).
    """
    import torch

    cpus = max(1, usable_cpus() // local_world_size())  # torchrun: ranks share the node
    if cuda:
        return max(1, min(8, cpus - 1))
    spare = cpus - torch.get_num_threads()
    if spare > 0:
        return min(8, spare)
    if cpus <= 4:
        return 1 if cpus >= 2 and (source_pixels or 0) >= LARGE_PIXELS else 0
    return min(8, cpus // 8)


def fixed_input_size(model) -> bool:
    """Vision transformers and friends embed fixed-size patches grids: they need their own input size."""
    pe = getattr(model, "patch_embed", None)
    return pe is not None and not getattr(pe, "dynamic_img_size", False) and getattr(pe, "img_size", None) is not None


def peek_shape(source, shards, max_pixels) -> tuple[int, int] | None:
    """(height, width) of the first decodable image: small images are scored at their native size,
    and large ones are decoded beside the forward pass (``auto_workers``)."""
    from ..decode import DEFAULT_MAX_PIXELS, decode_image

    for shard in shards[:3]:
        try:
            for i, s in enumerate(source.iter_samples(shard)):
                if s.ok:
                    try:
                        a = decode_image(s.image, max_pixels or DEFAULT_MAX_PIXELS)
                        return int(a.shape[0]), int(a.shape[1])
                    except DecodeError:
                        pass
                if i > 64:
                    break
        except SourceError:
            continue
    return None


@dataclass
class Plan:
    cfg: ScoreConfig
    source: Any
    shards: list
    metrics: list
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    meta: dict
    transform: dict | None = None  # the model's crop_pct, interpolation, crop_mode (models.data_config)
    ckpt_id: dict | None = None  # --checkpoint's identity and hash, for OUT's hash cache (init_out writes it)

    def preprocess(self) -> Preprocess:
        return eval_preprocess(self.image_size, self.cfg.max_pixels, self.transform or {}, self.mean)

    def stream(self, *, cuda: bool, hashes: bool = False) -> StreamSpec:
        """The picklable spec of an evaluation pass over this plan's data (``batches.run_stream``)."""
        cfg = self.cfg
        return StreamSpec(self.source.spec(), self.preprocess(), cfg.batch_size, cfg.workers,
                          cfg.on_error, num_classes=self.num_classes if any(m.needs_labels for m in self.metrics) else 0,
                          hashes=hashes, pin=cuda, decode=cfg.decode, exact_decode=cfg.exact_decode)


def eval_preprocess(size: int, max_pixels: int | None, transform: dict, mean=(0.0, 0.0, 0.0)) -> Preprocess:
    """The model's eval transform at ``size`` px (timm's: resize the shorter side to floor(size /
    crop_pct) with the model's interpolation, centre-crop ``size``). ``--image-size`` changes the
    size only, as timm's ``resolve_data_config`` does: crop_pct, interpolation and crop mode stay the
    model's. At ≤ NATIVE_MAX px — CIFAR-style images at their own size, given or not — crop_pct is
    1: a native S × S image is used as it is (cropping 2 of 32 px loses content for nothing), other
    small images are resized (shorter side to S) and centre-cropped."""
    small = size <= NATIVE_MAX
    return Preprocess(size, False, max_pixels, crop_pct=1.0 if small else float(transform.get("crop_pct", 1.0)),
                      interpolation=transform.get("interpolation", "bilinear"),
                      crop_mode="center" if small else transform.get("crop_mode", "center"),
                      fill=tuple(int(round(255 * m)) for m in mean))


def plan(cfg: ScoreConfig) -> Plan:
    """Validate options, open the source, resolve model defaults; no heavy work."""
    from .. import metrics as M
    from ..models import ModelSpec, checkpoint_hash, checkpoint_shapes, create_model, data_config, infer_num_classes
    from ..sources import open_source

    if not cfg.metrics:
        raise ConfigError("give at least one --metric; available: " + ", ".join(M.list_metrics()))
    metrics = [M.get_metric(m) for m in cfg.metrics]
    given, cfg = cfg, resolve_defaults(cfg, metrics)
    cfg.validate()
    if any(m.kind == "text" for m in metrics):
        return _text_plan(cfg, metrics)
    needs_training = any(m.needs_training for m in metrics)
    if needs_training and cfg.epochs == 0:
        names = [m.name for m in metrics if m.needs_training]
        raise ConfigError(f"{', '.join(names)} need proxy-model training: use --epochs ≥ 1")
    untrained = [m.name for m in metrics if m.kind == "eval"]
    if untrained and cfg.epochs == 0 and not cfg.checkpoint:
        raise ConfigError(f"{', '.join(untrained)} with --epochs 0 would score an untrained classifier (--pretrained weights get a "
                          "new head for your classes): give --checkpoint of a classifier trained on them, or train with --epochs ≥ 1")
    if cfg.runs > 1 and cfg.epochs == 0 and any(m.kind in ("eval", "embed") for m in metrics):
        raise ConfigError("--runs ≥ 2 needs proxy training (--epochs ≥ 1): a given checkpoint is one run")
    source = open_source(cfg.data, cfg.format, **cfg.source_options)
    shards = source.list_shards()
    _image_metrics_on_text(source, metrics)
    num_classes = cfg.num_classes
    ckpt_hash = head = ckpt_id = None
    if cfg.checkpoint:
        shapes = checkpoint_shapes(cfg.checkpoint)
        ckpt_hash, ckpt_id = checkpoint_hash(cfg.checkpoint, os.path.join(cfg.out, HASH_CACHE))
        head = infer_num_classes(shapes)
    if num_classes is None and source.classes:
        num_classes = len(source.classes)
    if num_classes is None:
        num_classes = head
    classifier = any(m.kind != "embed" for m in metrics) or cfg.epochs > 0
    if classifier and cfg.checkpoint and cfg.epochs == 0 and head is not None and num_classes != head:
        raise ConfigError(f"--checkpoint {cfg.checkpoint} has a {head}-class head but the data has {num_classes} classes")
    if num_classes is None and not classifier:
        num_classes = 0  # an encoder only: no classifier head needed
    if num_classes is None:
        raise ConfigError(f"{cfg.data}: cannot tell the number of classes (no classes.txt / class folders / checkpoint head); pass --num-classes")
    import torch

    with torch.device("meta"):  # only its config and structure are read here: no weights are made
        model = create_model(ModelSpec(cfg.model, num_classes, False, None))
    dc = data_config(model)
    shape = peek_shape(source, shards, cfg.max_pixels) if given.workers is None or cfg.image_size is None else None
    if given.workers is None and shape is not None:  # the worker rule knows the images' size now
        cfg = resolve_defaults(replace(cfg, workers=None), metrics, shape[0] * shape[1])
    size = cfg.image_size
    if size is None:
        native = max(shape) if shape is not None and not fixed_input_size(model) else None
        size = native if native is not None and native <= NATIVE_MAX else dc["input_size"]
        cfg.check_batch(size)
    declared = _declared(cfg, metrics)
    transform = {k: dc[k] for k in ("crop_pct", "interpolation", "crop_mode")}
    pre = eval_preprocess(size, cfg.max_pixels, transform, dc["mean"])
    meta = score_table_meta(
        source.spec(), source.classes, [s.name for s in shards], declared,
        config=cfg.fingerprint_fields(), checkpoint_sha256=ckpt_hash, data_fingerprint=_data_fingerprint(shards), image_size=size, mean=dc["mean"], std=dc["std"],
        num_classes=num_classes, eval_transform=describe(pre),
    )
    return Plan(cfg, source, shards, metrics, num_classes, size, dc["mean"], dc["std"], meta, transform, ckpt_id)


def _text_plan(cfg: ScoreConfig, metrics) -> Plan:
    """Text metrics read documents and build no model: no classes, image size or normalisation."""
    from ..config import TEXT_KEEPS, check_float, check_int
    from ..sources import open_source

    other = [m.name for m in metrics if m.kind != "text"]
    if other:
        raise ConfigError(f"{', '.join(other)} score images with a model and cannot run with text metrics "
                          f"({', '.join(m.name for m in metrics if m.kind == 'text')}) in one table")
    if cfg.epochs or cfg.runs > 1 or cfg.checkpoint:
        raise ConfigError("text metrics train no model: --epochs, --runs and --checkpoint do not apply")
    for name, value, low, high in (("--ngram", cfg.ngram, 1, 1000), ("--num-perm", cfg.num_perm, 2, 16_384),
                                   ("--min-span", cfg.min_span, 1, 10**6)):
        check_int(name, value, low, high)
    check_float("--threshold", cfg.threshold, 0, 1, low_open=True)
    if cfg.dedup_keep not in TEXT_KEEPS:
        raise ConfigError(f"--dedup-keep {cfg.dedup_keep} is for image dedup; text-dedup keeps {', '.join(TEXT_KEEPS)}")
    from ..sources.text import DEFAULT_TEXT_COLUMN

    cfg = replace(cfg, source_options={"text_column": DEFAULT_TEXT_COLUMN, **cfg.source_options})  # (wds: .txt/.json documents)
    source = open_source(cfg.data, cfg.format, **cfg.source_options)
    shards = source.list_shards()
    cfg = replace(cfg, model=None, pretrained=False, num_classes=None, device="cpu")  # (torchrun: gloo)
    meta = score_table_meta(source.spec(), None, [s.name for s in shards], _declared(cfg, metrics),
                            config=cfg.fingerprint_fields(), checkpoint_sha256=None, data_fingerprint=_data_fingerprint(shards),
                            num_classes=0, modality="text")
    return Plan(cfg, source, shards, metrics, 0, 0, (), (), meta)


def _image_metrics_on_text(source, metrics) -> None:
    if getattr(source, "modality", "image") == "text":
        raise ConfigError(f"{source.path} is a text corpus; {', '.join(m.name for m in metrics)} score images — "
                          "use --metric text-dedup or text-substr")


def describe(pre: Preprocess) -> dict:
    """The eval transform as the table metadata records it (scores depend on it: part of "same job")."""
    return {"size": pre.size, "resize": pre.resize_side, "crop_pct": pre.crop_pct, "interpolation": pre.interpolation,
            "crop_mode": pre.crop_mode}


def _declared(cfg: ScoreConfig, metrics) -> dict[str, dict]:
    """The table metadata's ``metrics``: per score column its metric, range, description and the
    options its values depend on; a metric without score columns (flags) is declared under its name."""
    declared = {}
    for m in metrics:
        params = {"model": cfg.model, "pretrained": cfg.pretrained, "epochs": cfg.epochs, "runs": cfg.runs}
        params.update(m.params(cfg) if m.params else {})
        if not m.score_columns:
            declared[m.name] = {"metric": m.name, "columns": list(m.extra_columns), "description": m.description,
                                "direction": m.direction, "params": params}
        for c in m.score_columns:
            declared[c] = {"metric": m.name, "range": [m.low, m.high], "description": m.description, "params": params}
    return declared


def _data_fingerprint(shards) -> str:
    """Shard names, byte sizes and (image folders) file lists: a rewritten dataset gets new scores."""
    h = hashlib.sha256()
    for sh in shards:
        h.update(json.dumps([sh.name, sh.size, list(sh.files)]).encode())
    return h.hexdigest()[:16]


def any_todo(todo: int, device, world: int) -> bool:
    """Whether any rank has shards left to score (the ranks must agree: training is collective). A
    complete table trains nothing again — its checkpoints may be gone (``finish_artifacts``)."""
    if world == 1:
        return todo > 0
    import torch
    import torch.distributed as dist

    n = torch.tensor([todo], dtype=torch.long, device=device)  # NCCL: on the GPU
    dist.all_reduce(n)
    return int(n.item()) > 0
