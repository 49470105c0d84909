"""Planning a score run: resolve defaults (model, epochs, workers), validate the options, open the
source, read the model's data config on the meta device, and check the output directory. No heavy work.
Also the names of the run's other files in OUT (checkpoints, proxy weights, embedding cache) and what
a finished run leaves of them (``finish_artifacts``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, replace
from typing import Any

from ..config import ScoreConfig
from ..distributed import local_world_size, usable_cpus
from ..errors import ConfigError, DecodeError, SourceError, TableError
from ..scoretable import PART_RE, PARTS_DIR, flat_parts, marker_indices, read_table_meta, score_table_meta, write_table_meta
from ..tables import DONE_DIR, META_FILE
from .batches import NATIVE_MAX, Preprocess, StreamSpec

CKPT_DIR = ".train"  # resume checkpoints OUT/.train/run-R.pt: removed when the run completes, unless keep_artifacts
EMBED_DIR = "_embeddings"  # the embedding cache's default root
DEFAULT_MODEL = "resnet18"
DEFAULT_ENCODER = "vit_small_patch16_224.dino"  # self-supervised DINO ViT-S/16 (timm / HF hub weights)
DEFAULT_EPOCHS = 10


def resolve_defaults(cfg: ScoreConfig, metrics) -> ScoreConfig:
    """Fill ``model``, ``epochs`` and ``workers`` left as None (workers: see ``auto_workers``).

    * model: resnet18 — except for runs with only embedding metrics and neither --checkpoint nor
      --epochs, which use the self-supervised DINO ViT-S/16 with its pretrained weights (the paper's
      prototype metric uses a self-supervised encoder).
    * epochs: 10 when a metric needs training (forgetting, aum) or when model-output metrics
      (el2n, loss, margin, entropy) have no --checkpoint/--pretrained model to score; else 0.
    """
    kinds = {m.kind for m in metrics}
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

        workers = auto_workers(resolve_device(cfg.device).type == "cuda")
    return replace(cfg, model=model, pretrained=pretrained, epochs=epochs, workers=workers)


def _stored_workers(out: str) -> int | None:
    """The worker count an existing training run's table recorded (it shapes the data order, so it is
    part of the fingerprint): a job requeued on a node with other cores resumes instead of stopping."""
    try:
        w = read_table_meta(out).get("config", {}).get("workers")
    except (TableError, OSError, ValueError, AttributeError):
        return None
    return w if isinstance(w, int) and not isinstance(w, bool) and w >= 0 else None


def auto_workers(cuda: bool) -> int:
    """Decode worker processes for ``--workers`` left unset.

    * CUDA: the GPU computes and the CPU only decodes, so up to 8 workers, one core left for the
      main process.
    * CPU: the model's intra-op threads already use every core. A decode worker then takes a core
      from them, and the whole batch waits for the preempted thread: on this project's 2-core
      machine one worker cost more (0.83 of the forward-only speed) than decoding in the main
      process between forwards (0.89; benchmarks/bench_score.py, medians of paired runs). So 0
      workers up to 4 cores; above that, cores the model's threads leave free, else one worker per
      8 cores (not measured here: no such machine).
    Under torchrun the node's cores are divided among its ranks (LOCAL_WORLD_SIZE).
    """
    import torch

    cpus = max(1, usable_cpus() // local_world_size())  # torchrun: ranks share the node
    if cuda:
        return max(1, min(8, cpus - 1))
    spare = cpus - torch.get_num_threads()
    if spare > 0:
        return min(8, spare)
    return 0 if cpus <= 4 else min(8, cpus // 8)


def fixed_input_size(model) -> bool:
    """Vision transformers and friends embed fixed-size patches grids: they need their own input size."""
    pe = getattr(model, "patch_embed", None)
    return pe is not None and not getattr(pe, "dynamic_img_size", False) and getattr(pe, "img_size", None) is not None


def peek_size(source, shards, max_pixels) -> int | None:
    """Longest side of the first decodable image (to score small images at their native size)."""
    from ..decode import DEFAULT_MAX_PIXELS, decode_image

    for shard in shards[:3]:
        try:
            for i, s in enumerate(source.iter_samples(shard)):
                if s.ok:
                    try:
                        a = decode_image(s.image, max_pixels or DEFAULT_MAX_PIXELS)
                        return int(max(a.shape[:2]))
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

    def stream(self, *, cuda: bool, hashes: bool = False) -> StreamSpec:
        """The picklable spec of an evaluation pass over this plan's data (``batches.run_stream``)."""
        cfg = self.cfg
        return StreamSpec(self.source.spec(), Preprocess(self.image_size, False, cfg.max_pixels), cfg.batch_size, cfg.workers,
                          cfg.on_error, num_classes=self.num_classes if any(m.needs_labels for m in self.metrics) else 0,
                          hashes=hashes, pin=cuda)


def plan(cfg: ScoreConfig) -> Plan:
    """Validate options, open the source, resolve model defaults; no heavy work."""
    from .. import metrics as M
    from ..models import ModelSpec, checkpoint_shapes, create_model, data_config, file_sha256, infer_num_classes
    from ..sources import open_source

    if not cfg.metrics:
        raise ConfigError("give at least one --metric; available: " + ", ".join(M.list_metrics()))
    metrics = [M.get_metric(m) for m in cfg.metrics]
    cfg = resolve_defaults(cfg, metrics)
    cfg.validate()
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
    num_classes = cfg.num_classes
    ckpt_hash = head = None
    if cfg.checkpoint:
        shapes = checkpoint_shapes(cfg.checkpoint)
        ckpt_hash = file_sha256(cfg.checkpoint)
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
    size = cfg.image_size
    if size is None:
        native = peek_size(source, shards, cfg.max_pixels) if not fixed_input_size(model) else None
        size = native if native is not None and native <= NATIVE_MAX else dc["input_size"]
        cfg.check_batch(size)
    declared = _declared(cfg, metrics)
    meta = score_table_meta(
        source.spec(), source.classes, [s.name for s in shards], declared,
        config=cfg.fingerprint_fields(), checkpoint_sha256=ckpt_hash, data_fingerprint=_data_fingerprint(shards), image_size=size, mean=dc["mean"], std=dc["std"],
        num_classes=num_classes,
    )
    return Plan(cfg, source, shards, metrics, num_classes, size, dc["mean"], dc["std"], meta)


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


def check_out(p: Plan) -> bool:
    """Validate the output directory (read-only, every rank). True if it holds this same job.
    Metadata that does not parse as ours is not trusted: with nothing scored yet it is rewritten,
    else the table needs --overwrite."""
    cfg = p.cfg
    parts = os.path.join(cfg.out, PARTS_DIR)
    if os.path.islink(parts) or (os.path.lexists(parts) and not os.path.isdir(parts)):
        raise ConfigError(f"{parts} is a link or a file, not the table's own directory of parts; move it away or use another --out")
    if flat_parts(cfg.out) and not cfg.overwrite and os.path.lexists(os.path.join(cfg.out, META_FILE)):
        raise ConfigError(f"{cfg.out} is a score table in dataprune 0.1's layout (parts at its top level), which is read but not "
                          f"written into: to resume it, move its parts first (mkdir {parts} && mv {os.path.join(cfg.out, 'part-')}*.parquet "
                          f"{parts}/), or use --overwrite to score it afresh, or another --out")
    if os.path.lexists(os.path.join(cfg.out, META_FILE)):
        try:
            old, bad = read_table_meta(cfg.out), None
        except TableError as e:
            old, bad = {}, e
        same = bad is None and (old.get("config") == json.loads(json.dumps(p.meta["config"]))
                                and old.get("shard_fingerprint") == p.meta["shard_fingerprint"]
                                and old.get("checkpoint_sha256") == p.meta["checkpoint_sha256"]
                                and old.get("data_fingerprint") == p.meta["data_fingerprint"])
        if cfg.overwrite:
            return False
        started = marker_indices(cfg.out) or os.path.isdir(os.path.join(cfg.out, CKPT_DIR))
        if bad is not None and started:
            raise TableError(f"{bad}; use --overwrite to score the table afresh, or another --out")
        if not same and started:
            raise ConfigError(f"{cfg.out} holds scores made with other parameters or data; use --overwrite to replace them, "
                              "or --out for a new table")
        return same
    holds = [d for d in (cfg.out, parts) if os.path.isdir(d) and any(PART_RE.fullmatch(n) for n in os.listdir(d))]
    if holds and not cfg.overwrite:
        raise ConfigError(f"{holds[0]} holds parts without {os.path.join(cfg.out, META_FILE)}; use --overwrite or another --out")
    return False


def check_out_location(p: Plan) -> None:
    """--out must not be, or be inside, a directory of the input data (nothing is written there)."""
    p.source.refuse_output_inside(p.cfg.out, [s.path for s in p.shards])


def init_out(p: Plan, same: bool) -> None:
    """Rank 0: clear a table made with other parameters (under --overwrite) and write the metadata."""
    cfg = p.cfg
    parts = os.path.join(cfg.out, PARTS_DIR)
    if not same and os.path.isdir(cfg.out):
        for n in os.listdir(cfg.out):
            full = os.path.join(cfg.out, n)
            if (PART_RE.fullmatch(n) or n.startswith(".part-") or re.fullmatch(r"_proxy-run\d+\.safetensors", n)
                    or n in (META_FILE, CKPT_DIR, DONE_DIR)):
                shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.unlink(full)
        for n in os.listdir(parts) if os.path.isdir(parts) else []:  # only our parts: anything else there stays
            if PART_RE.fullmatch(n) and not os.path.isdir(os.path.join(parts, n)):
                os.unlink(os.path.join(parts, n))
    _remove_stale_temps(cfg.out)
    os.makedirs(parts, exist_ok=True)
    write_table_meta(cfg.out, p.meta)


STALE_TMP = re.compile(r"\.(part-\d{6}\.(parquet|json)|_dataprune\.json)\..+\.tmp")


def _remove_stale_temps(out: str) -> None:
    """Temporary files of a killed run (the run holds OUT's lock, so no other writer owns them)."""
    for d in (out, os.path.join(out, DONE_DIR)):
        if os.path.isdir(d) and not os.path.islink(d):
            for n in os.listdir(d):
                if STALE_TMP.fullmatch(n) and os.path.isfile(os.path.join(d, n)):
                    os.unlink(os.path.join(d, n))


def ckpt_path(out: str, run: int) -> str:
    return os.path.join(out, CKPT_DIR, f"run-{run}.pt")


def proxy_path(out: str, run: int) -> str:
    """The proxy trained by run ``run`` (safetensors; reusable with --checkpoint, e.g. as an encoder)."""
    return os.path.join(out, f"_proxy-run{run}.safetensors")


def embed_root(cfg: ScoreConfig) -> str:
    return cfg.cache_dir or os.path.join(cfg.out, EMBED_DIR)


def _bytes(path: str) -> int:
    """Bytes of a regular file, or of the regular files under a directory (links are not followed)."""
    if not os.path.isdir(path):
        return os.lstat(path).st_size
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(path) for f in fs
               if not os.path.islink(os.path.join(d, f)))


def finish_artifacts(cfg: ScoreConfig, embed: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Rank 0, once every part of the table is written: remove the resume checkpoints (unless
    ``keep_artifacts``; only the files this run names, then ``.train`` if that leaves it empty), and
    list what stays beside the table — checkpoints kept, proxy weights, the embedding cache (``embed``:
    the run used one; OUT's default cache is listed whenever it exists) — as ``{path, kind, bytes}``.
    Returns (artifacts, removed paths)."""
    removed = []
    ckdir = os.path.join(cfg.out, CKPT_DIR)
    if not cfg.keep_artifacts and os.path.isdir(ckdir) and not os.path.islink(ckdir):
        for n in sorted(os.listdir(ckdir)):  # the checkpoints, and temporary files of a checkpoint a kill interrupted
            full = os.path.join(ckdir, n)
            if re.fullmatch(r"run-\d+\.pt|\.run-\d+\.pt\..+\.tmp", n) and os.path.isfile(full) and not os.path.islink(full):
                os.unlink(full)
                removed.append(full)
        try:
            os.rmdir(ckdir)
        except OSError:  # not empty: something else is in it, and stays
            pass
    found = [(ckpt_path(cfg.out, r), "checkpoint") for r in range(cfg.runs)] + [(proxy_path(cfg.out, r), "proxy") for r in range(cfg.runs)]
    found += [(d, "embedding cache") for d in dict.fromkeys([os.path.join(cfg.out, EMBED_DIR)] + ([embed_root(cfg)] if embed else []))]
    return [{"path": path, "kind": kind, "bytes": _bytes(path)} for path, kind in found
            if os.path.lexists(path) and not os.path.islink(path)], removed


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
