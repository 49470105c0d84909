"""The streaming scoring loop.

shards ──► DataLoader workers (read + decode + resize, one shard at a time, batches never mix
shards) ──► device ──► metrics ──► one parquet part per shard (atomic, with a done-marker).

Workers rebuild the source from its small spec; the main process keeps only the in-flight shards'
metric values. A rerun skips shards whose done-marker exists; a rerun with different parameters
stops unless ``--overwrite``. Under ``torchrun`` each rank scores ``shards[rank::world_size]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from .errors import ConfigError, DecodeError, SourceError, TableError, check_stop
from .tables import DONE_DIR, META_FILE, RowBuffer, done_parts, read_table_meta, score_table_meta, write_part, write_table_meta

DEFAULT_OUT = os.path.join("dataprune-out", "scores")
NATIVE_MAX = 64  # images no larger than this are scored at their own size when --image-size is not given
PART_RE = re.compile(r"part-\d{6}\.parquet")
DEFAULT_MODEL = "resnet18"
DEFAULT_ENCODER = "vit_small_patch16_224.dino"  # self-supervised DINO ViT-S/16 (timm / HF hub weights)
DEFAULT_EPOCHS = 10


def resolve_defaults(cfg: "ScoreConfig", metrics) -> "ScoreConfig":
    """Fill ``model``, ``epochs`` and ``workers`` left as None (workers: see ``auto_workers``).

    * model: resnet18 — except for runs with only embedding metrics and neither --checkpoint nor
      --epochs, which use the self-supervised DINO ViT-S/16 with its pretrained weights (the paper's
      prototype metric uses a self-supervised encoder).
    * epochs: 10 when a metric needs training (forgetting, aum) or when model-output metrics
      (el2n, loss, margin, entropy) have no --checkpoint/--pretrained model to score; else 0.
    """
    from dataclasses import replace

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
        from .models import resolve_device

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


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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

    cpus = max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun: ranks share the node
    if cuda:
        return max(1, min(8, cpus - 1))
    spare = cpus - torch.get_num_threads()
    if spare > 0:
        return min(8, spare)
    return 0 if cpus <= 4 else min(8, cpus // 8)


@dataclass(frozen=True)
class ScoreConfig:
    data: str
    metrics: tuple[str, ...] = ("el2n",)
    out: str = DEFAULT_OUT
    format: str | None = None
    source_options: dict = field(default_factory=dict)
    model: str | None = None  # None: resnet18, or for embedding-only runs without --checkpoint DEFAULT_ENCODER (pretrained)
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    device: str = "auto"
    batch_size: int = 128
    workers: int | None = None  # None: auto_workers (0 on a CPU device with ≤ 4 cores)
    image_size: int | None = None
    epochs: int | None = None  # None: see resolve_defaults
    score_epoch: int | None = None
    runs: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    shuffle_buffer: int = 2000
    grand_params: str = "all"
    seed: int = 0
    on_error: str = "skip"
    max_pixels: int | None = None
    overwrite: bool = False
    clusters: int | None = None  # k-means k (None: number of classes, else round(sqrt(N/2)))
    kmeans_iters: int = 20
    kmeans_sample: int | None = 200_000  # fit k-means on at most this many rows (seeded), then assign all
    kmeans_backend: str = "auto"
    dedup_eps: float = 0.05  # semantic duplicates: cosine similarity ≥ 1 - eps
    dedup_keep: str = "hard"  # SemDeDup keeps the copy farthest from its cluster centroid
    cache_dir: str | None = None  # embedding cache (None: OUT/_embeddings)

    def fingerprint_fields(self) -> dict[str, Any]:
        """What makes two runs produce the same table (not where it goes or how fast it runs)."""
        d = asdict(self)
        drop = ["out", "device", "overwrite", "on_error", "cache_dir", "checkpoint"]  # checkpoint: compared by its hash
        if not self.epochs:
            drop += ["batch_size", "workers"]  # they change the training data order, nothing else
        elif (world := dist_info()[1]) > 1:
            d["world_size"] = world  # ranks train together on their own shards: another data order
        for k in drop:
            d.pop(k)
        d["data"] = self.data if "://" in self.data or "{" in self.data else os.path.abspath(self.data)
        d["metrics"] = sorted(d["metrics"])
        return d


# ------------------------------------------------------------------------------------ preprocessing

@dataclass(frozen=True)
class Preprocess:
    size: int
    train: bool = False
    max_pixels: int | None = None

    def __call__(self, arr: np.ndarray, gen=None):
        """(H, W, 3) uint8 → (3, S, S) uint8 tensor; for evaluation at the image's own size the
        array itself is returned (batched without per-sample torch work, see EvalStream._batch)."""
        s = self.size
        if not self.train and arr.shape[0] == s and arr.shape[1] == s:
            return arr
        if not self.train:  # resize + centre crop, back to (S, S, 3): every evaluation item has one layout
            import torchvision.transforms.v2.functional as TF

            from .decode import to_tensor

            x = TF.center_crop(TF.resize(to_tensor(arr), s, antialias=True), [s, s])
            return np.ascontiguousarray(x.permute(1, 2, 0).numpy())
        import torch
        import torchvision.transforms.v2.functional as TF

        from .decode import to_tensor

        x = to_tensor(arr)
        h, w = x.shape[-2:]
        if self.train and s <= NATIVE_MAX:  # CIFAR-style: resize, pad 4 (reflect), random crop, flip
            if (h, w) != (s, s):
                x = TF.center_crop(TF.resize(x, s, antialias=True), [s, s])
            x = TF.pad(x, [4, 4, 4, 4], padding_mode="reflect")
            i, j = torch.randint(0, 9, (2,), generator=gen).tolist()
            x = x[:, i : i + s, j : j + s]
        elif self.train:  # random-resized crop, scale (0.35, 1)
            area = h * w * float(torch.empty(1).uniform_(0.35, 1.0, generator=gen))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
            cw, ch = min(w, int(round(math.sqrt(area * ratio)))), min(h, int(round(math.sqrt(area / ratio))))
            i = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            j = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            x = TF.resize(x[:, i : i + ch, j : j + cw], [s, s], antialias=True)
        elif (h, w) != (s, s):
            x = TF.center_crop(TF.resize(x, s, antialias=True), [s, s])
        if self.train and bool(torch.randint(0, 2, (1,), generator=gen)):
            x = x.flip(-1)
        return x.contiguous()


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


def worker_shards(shards: list) -> tuple[list, int, int]:
    """The shards this DataLoader worker handles (of those given to its rank), and the worker id/count."""
    import torch.utils.data as tud

    info = tud.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return shards[wid::nw], wid, nw


class EvalStream:
    """IterableDataset of per-shard batches: ``{"shard", "rows", "images", "labels", "done", "base", ...}``.

    Batches never mix shards; the last batch of a shard has ``done=True`` and carries the base
    columns of every sample in the shard (skipped ones included, with their reason)."""

    def __init__(self, spec: dict, shards: list, pre: Preprocess, batch_size: int, on_error: str, hashes: bool = False,
                 num_classes: int = 0):
        self.spec, self.shards, self.pre, self.batch_size, self.on_error = spec, shards, pre, batch_size, on_error
        self.hashes = hashes  # also return blake2b-64 hashes of each image's bytes and decoded pixels
        self.num_classes = num_classes  # > 0: labels outside [0, num_classes) are skipped as bad_label

    def __iter__(self):
        from .errors import DataPruneError

        try:
            yield from self._iter()
        except DataPruneError as e:  # hand the error to the main process whole (no worker traceback)
            yield {"fatal": (type(e).__name__, str(e), getattr(e, "reason", None))}

    def _iter(self):
        from .decode import DEFAULT_MAX_PIXELS, decode_image
        from .sources import source_from_spec

        mine, _, _ = worker_shards(self.shards)
        source = source_from_spec(self.spec)
        max_pixels = self.pre.max_pixels or DEFAULT_MAX_PIXELS
        if self.hashes:
            from .metrics.dedup import bytes_hash, pixel_hash
        for shard in mine:
            base = RowBuffer()
            imgs, rows, labels, hb, hp = [], [], [], [], []
            t_read = 0.0
            t0 = time.perf_counter()
            shard_error = None
            try:
                for s in source.iter_samples(shard):
                    row = len(base)
                    if s.ok and self.num_classes and s.label is not None and not 0 <= s.label < self.num_classes:
                        s.status = "bad_label"
                        s.error = f"{s.loc_path}: sample {s.key!r}: label {s.label} is outside 0..{self.num_classes - 1}"
                    if s.ok:
                        try:
                            arr = decode_image(s.image, max_pixels)
                            imgs.append(self.pre(arr))
                            rows.append(row)
                            labels.append(-1 if s.label is None else s.label)
                            if self.hashes:
                                hb.append(bytes_hash(s.image))
                                hp.append(pixel_hash(arr))
                        except DecodeError as e:
                            s.status, s.error = e.reason, f"{s.loc_path}: sample {s.key!r}: {e}"
                    if not s.ok and self.on_error == "raise":
                        if s.status in ("decode_error", "too_large"):
                            raise DecodeError(s.error or s.status, reason=s.status)
                        raise SourceError(s.error or s.status, reason=s.status)
                    base.add(s)
                    if len(imgs) == self.batch_size:
                        t_read += time.perf_counter() - t0
                        yield self._batch(shard, imgs, rows, labels, t_read, hb, hp)
                        imgs, rows, labels, hb, hp, t_read = [], [], [], [], [], 0.0
                        t0 = time.perf_counter()
            except SourceError as e:
                if self.on_error == "raise":
                    raise
                shard_error = (e.reason, str(e))
            t_read += time.perf_counter() - t0
            b = self._batch(shard, imgs, rows, labels, t_read, hb, hp)
            b.update(done=True, base=Opaque(base.cols), shard_error=shard_error)
            yield b

    @staticmethod
    def _batch(shard, imgs, rows, labels, t_read, hb, hp):
        import torch

        return {
            "hashes": [hb, hp],
            "shard": shard.index,
            "images": _stack(imgs),
            "rows": torch.tensor(rows, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "done": False,
            "read_s": t_read,
        }


def _stack(imgs: list):
    """A uint8 batch. HWC arrays are stacked as NHWC and viewed as NCHW: channels-last memory, which
    the CPU and GPU convolution kernels run fastest on."""
    import torch

    if not imgs:
        return torch.empty(0, dtype=torch.uint8)
    if isinstance(imgs[0], np.ndarray):
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    return torch.stack(imgs).contiguous(memory_format=torch.channels_last)


def make_iterable(obj):
    """Wrap a plain iterable class as a torch IterableDataset (keeps torch out of module import)."""
    import torch.utils.data as tud

    class _DS(tud.IterableDataset):
        def __iter__(self_inner):
            return iter(obj)

    return _DS()


class Opaque:
    """Carries a value through the DataLoader untouched: pin_memory (CUDA) would otherwise walk
    every element of a shard's base columns in its thread, holding the GIL."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def _as_is(batch):
    return batch


def loader(dataset, workers: int, batch_size: int | None, pin: bool):
    """batch_size None: the dataset yields whole batches, passed on as they are — torch's default
    conversion would walk every element of a shard's base columns (~11 µs a sample on CIFAR)."""
    import torch.utils.data as tud

    return tud.DataLoader(make_iterable(dataset), batch_size=batch_size, num_workers=workers, pin_memory=pin,
                          worker_init_fn=_worker_init if workers else None, persistent_workers=False,
                          prefetch_factor=4 if workers else None, collate_fn=_as_is if batch_size is None else None)


# -------------------------------------------------------------------------------------- distributed

def dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_shards(shards: list, rank: int, world: int) -> list:
    """The shards a torchrun rank trains on, embeds and scores: the same split everywhere, so a
    rank's training statistics and embeddings cover exactly the parts it writes."""
    return shards[rank::world]


# ----------------------------------------------------------------------------------------- scoring

class Normalizer:
    def __init__(self, mean, std, device, channels_last: bool):
        import torch

        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.device, self.channels_last = device, channels_last

    def __call__(self, images):
        import torch

        x = images.to(self.device, non_blocking=True).float()
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def fixed_input_size(model) -> bool:
    """Vision transformers and friends embed fixed-size patches grids: they need their own input size."""
    pe = getattr(model, "patch_embed", None)
    return pe is not None and not getattr(pe, "dynamic_img_size", False) and getattr(pe, "img_size", None) is not None


def peek_size(source, shards, max_pixels) -> int | None:
    """Longest side of the first decodable image (to score small images at their native size)."""
    from .decode import DEFAULT_MAX_PIXELS, decode_image

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


def plan(cfg: ScoreConfig) -> Plan:
    """Validate options, open the source, resolve model defaults; no heavy work."""
    from . import metrics as M
    from .models import ModelSpec, checkpoint_shapes, create_model, data_config, file_sha256, infer_num_classes
    from .sources import open_source

    if not cfg.metrics:
        raise ConfigError("give at least one --metric; available: " + ", ".join(M.list_metrics()))
    metrics = [M.get_metric(m) for m in cfg.metrics]
    cfg = resolve_defaults(cfg, metrics)
    if cfg.on_error not in ("skip", "raise"):
        raise ConfigError("--on-error must be 'skip' or 'raise'")
    if cfg.batch_size < 1 or cfg.workers < 0 or cfg.runs < 1 or cfg.epochs < 0:
        raise ConfigError("--batch-size and --runs must be ≥ 1, --workers and --epochs ≥ 0")
    needs_training = any(m.needs_training for m in metrics)
    if needs_training and cfg.epochs == 0:
        names = [m.name for m in metrics if m.needs_training]
        raise ConfigError(f"{', '.join(names)} need proxy-model training: use --epochs ≥ 1")
    untrained = [m.name for m in metrics if m.kind == "eval"]
    if untrained and cfg.epochs == 0 and not cfg.checkpoint:
        raise ConfigError(f"{', '.join(untrained)} with --epochs 0 would score an untrained classifier (--pretrained weights get a "
                          "new head for your classes): give --checkpoint of a classifier trained on them, or train with --epochs ≥ 1")
    if cfg.score_epoch is not None and not 1 <= cfg.score_epoch <= cfg.epochs:
        raise ConfigError("--score-epoch must be between 1 and --epochs")
    if cfg.grand_params not in ("all", "head"):
        raise ConfigError("--grand-params must be 'all' or 'head'")
    if cfg.schedule not in ("cosine", "step"):
        raise ConfigError("--schedule must be 'cosine' or 'step'")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise ConfigError("--image-size must be at least 8")
    if cfg.shuffle_buffer < 1:
        raise ConfigError("--shuffle-buffer must be at least 1")
    if cfg.seed < 0:
        raise ConfigError("--seed must be ≥ 0")
    if cfg.max_pixels is not None and cfg.max_pixels < 1:
        raise ConfigError("--max-pixels must be ≥ 1")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise ConfigError("--num-classes must be ≥ 1")
    if cfg.runs > 1 and cfg.epochs == 0 and any(m.kind in ("eval", "embed") for m in metrics):
        raise ConfigError("--runs ≥ 2 needs proxy training (--epochs ≥ 1): a given checkpoint is one run")
    if cfg.dedup_keep not in ("easy", "hard", "random"):
        raise ConfigError("--dedup-keep must be easy, hard or random")
    if not 0 < cfg.dedup_eps < 1:
        raise ConfigError("--eps must be in (0, 1)")
    if cfg.kmeans_backend not in ("auto", "torch", "faiss"):
        raise ConfigError("--kmeans-backend must be auto, torch or faiss")
    if cfg.clusters is not None and cfg.clusters < 1:
        raise ConfigError("--clusters must be ≥ 1")
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
    declared = {}
    for m in metrics:
        params = {"model": cfg.model, "pretrained": cfg.pretrained, "epochs": cfg.epochs, "runs": cfg.runs}
        if m.kind == "embed":
            params.update(clusters=cfg.clusters, kmeans_iters=cfg.kmeans_iters, kmeans_sample=cfg.kmeans_sample)
        if m.name == "dedup":
            declared["dedup"] = {"metric": "dedup", "columns": list(m.extra_columns), "description": m.description,
                                 "direction": "is_duplicate = True marks redundant rows", "params": {**params, "eps": cfg.dedup_eps,
                                                                                                     "keep": cfg.dedup_keep}}
        for c in m.score_columns:
            declared[c] = {"metric": m.name, "range": [m.low, m.high], "description": m.description, "params": params}
    meta = score_table_meta(
        source.spec(), source.classes, [s.name for s in shards], declared,
        config=cfg.fingerprint_fields(), checkpoint_sha256=ckpt_hash, data_fingerprint=_data_fingerprint(shards), image_size=size, mean=dc["mean"], std=dc["std"],
        num_classes=num_classes,
    )
    return Plan(cfg, source, shards, metrics, num_classes, size, dc["mean"], dc["std"], meta)


def _data_fingerprint(shards) -> str:
    """Shard names, byte sizes and (image folders) file lists: a rewritten dataset gets new scores."""
    h = hashlib.sha256()
    for sh in shards:
        h.update(json.dumps([sh.name, sh.size, list(sh.files)]).encode())
    return h.hexdigest()[:16]


def _check_out(p: Plan) -> bool:
    """Validate the output directory (read-only, every rank). True if it holds this same job."""
    cfg = p.cfg
    if os.path.exists(os.path.join(cfg.out, META_FILE)):
        old = read_table_meta(cfg.out)
        same = (old.get("config") == json.loads(json.dumps(p.meta["config"])) and old.get("shard_fingerprint") == p.meta["shard_fingerprint"]
                and old.get("checkpoint_sha256") == p.meta["checkpoint_sha256"]
                and old.get("data_fingerprint") == p.meta["data_fingerprint"])
        if cfg.overwrite:
            return False
        started = done_parts(cfg.out) or os.path.isdir(os.path.join(cfg.out, ".train"))
        if not same and started:
            raise ConfigError(f"{cfg.out} holds scores made with other parameters or data; use --overwrite to replace them, "
                              "or --out for a new table")
        return same
    if os.path.isdir(cfg.out) and any(PART_RE.fullmatch(n) for n in os.listdir(cfg.out)) and not cfg.overwrite:
        raise ConfigError(f"{cfg.out} holds parts without {META_FILE}; use --overwrite or another --out")
    return False


def _check_out_location(p: Plan) -> None:
    """--out must not be, or be inside, a directory of the input data (nothing is written there)."""
    out = os.path.realpath(p.cfg.out)
    if p.source.format == "folder":
        dirs = {p.source.root}
    else:
        dirs = {os.path.dirname(s.path) for s in p.shards if "://" not in s.path}
    for d in filter(None, dirs):
        d = os.path.realpath(d)
        if out == d or out.startswith(d.rstrip(os.sep) + os.sep):
            raise ConfigError(f"--out {p.cfg.out} is inside the input data ({d}); choose a directory outside it")


def _init_out(p: Plan, same: bool) -> None:
    """Rank 0: clear a table made with other parameters (under --overwrite) and write the metadata."""
    cfg = p.cfg
    if not same and os.path.isdir(cfg.out):
        for n in os.listdir(cfg.out):
            full = os.path.join(cfg.out, n)
            if PART_RE.fullmatch(n) or n.startswith(".part-") or re.fullmatch(r"_proxy-run\d+\.safetensors", n) or n == META_FILE:
                os.unlink(full)
            elif n in (".train", DONE_DIR):
                shutil.rmtree(full)
    os.makedirs(cfg.out, exist_ok=True)
    write_table_meta(cfg.out, p.meta)


@dataclass
class Timings:
    read: float = 0.0  # time the main loop waited for data
    decode: float = 0.0  # time workers spent reading + decoding (summed over workers)
    compute: float = 0.0
    write: float = 0.0


def score(cfg: ScoreConfig, *, on_event: Callable[[str, dict], None] | None = None) -> dict[str, Any]:
    """Run ``dataprune score``. ``on_event(kind, info)`` receives progress events."""
    import torch

    from .models import ModelSpec, create_model, resolve_device
    from .metrics import check_range
    from .metrics.dynamics import eval_metrics, grand_scores

    emit = on_event or (lambda kind, info: None)
    t_start = time.perf_counter()
    rank, world = dist_info()
    p = plan(cfg)
    cfg = p.cfg  # defaults resolved
    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    _check_out_location(p)
    same = _check_out(p)
    if rank == 0:
        _init_out(p, same)
    if world > 1:
        torch.distributed.barrier()
    finished = done_parts(cfg.out)
    names = [m.name for m in p.metrics]
    needs_labels = any(m.needs_labels for m in p.metrics)
    all_need_labels = all(m.needs_labels for m in p.metrics)  # else unlabelled rows stay ok, label metrics NaN
    todo = [s for s in rank_shards(p.shards, rank, world) if s.index not in finished]
    emit("plan", {"shards": len(p.shards), "todo": len(todo), "done": len(finished), "image_size": p.image_size,
                  "device": str(device), "metrics": names, "rank": rank, "world": world})

    # models: one per run (trained for dynamics metrics, else the given/pretrained one), and init models for grand
    from .training import train_runs

    train_stats = None
    runs_models = []
    cuda = device.type == "cuda"
    kinds = {m.kind for m in p.metrics}
    if cfg.epochs > 0 and kinds & {"train", "eval", "embed"}:
        runs_models, train_stats = train_runs(p, device, emit, rank, world)
    elif "eval" in kinds:
        runs_models = [create_model(ModelSpec(cfg.model, p.num_classes, cfg.pretrained, cfg.checkpoint))]
    init_models = []
    if "grand" in names:
        for r in range(cfg.runs):
            torch.manual_seed(cfg.seed + 1000 * r)
            # GraNd is taken at initialisation: fresh (or --pretrained) weights, seeded per run, never --checkpoint
            init_models.append(create_model(ModelSpec(cfg.model, p.num_classes, cfg.pretrained, None)))
    for m in runs_models + init_models:
        m.to(device).eval()
        m.to(memory_format=torch.channels_last)  # faster on CPU (oneDNN) and GPU alike
    norm = Normalizer(p.mean, p.std, device, True)
    eval_names = [n for n in names if get_kind(n).kind == "eval"]
    multi = cfg.runs > 1

    embed = None
    if any(m.kind == "embed" for m in p.metrics):
        from .embedding import run_embedding

        embed = run_embedding(p, device, emit, runs_models, None, rank, world)

    counts = {"seen": 0, "scored": 0, "skipped": 0}
    reasons: dict[str, int] = {}

    def write(sidx: int, base: dict, cols: dict, shard_error) -> dict:
        import pyarrow as pa

        from .metrics import get_metric

        nrows = len(base["sample_id"])
        if shard_error:
            reasons[shard_error[0]] = reasons.get(shard_error[0], 0) + 1
        if all_need_labels:  # no metric of this run can score a sample without a label
            for i, (st_, lbl) in enumerate(zip(base["status"], base["label"])):
                if st_ == "ok" and lbl is None:
                    base["status"][i] = "no_label"
                    base["error"][i] = f"{base['loc_path'][i]}: sample {base['key'][i]!r} has no label"
        for k in names:
            for c in get_metric(k).score_columns:
                check_range(k, cols[c])
        buf = RowBuffer()
        buf.cols = base
        table = buf.table({k: pa.array(v) for k, v in cols.items() if not k.endswith("__runs")})
        bad = [s_ for s_ in base["status"] if s_ != "ok"]
        st = {"seen": nrows, "scored": nrows - len(bad), "skipped": len(bad), "shard_error": shard_error,
              "reasons": {s_: int(c) for s_, c in zip(*np.unique(bad, return_counts=True))} if bad else {}}
        for s_ in bad:
            reasons[s_] = reasons.get(s_, 0) + 1
        if multi:
            st["runs"] = {k[:-6]: v.tolist() for k, v in cols.items() if k.endswith("__runs")}
        write_part(cfg.out, sidx, table, st)
        for k in ("seen", "scored", "skipped"):
            counts[k] += st[k]
        return st

    t = Timings()
    if embed is not None and not (eval_names or init_models or train_stats):
        # every metric comes from the embedding cache: write the parts from it, no second read of the data
        for shard in todo:
            t0 = time.perf_counter()
            base = embed.base(shard.index)
            cols = embed.columns(shard.index, len(base["sample_id"]))
            st = write(shard.index, base, cols, embed.shard_error(shard.index))
            t.write += time.perf_counter() - t0
            emit("shard", {"index": shard.index, **st, "timings": asdict(t), "elapsed": time.perf_counter() - t_start})
    else:
        def compute(batch) -> dict[str, np.ndarray]:
            labels = batch["labels"].to(device)
            valid = labels >= 0
            if needs_labels and not bool(valid.all()):
                labels = labels.clamp_min(0)
            x = norm(batch["images"])
            per_run: dict[str, list] = {k: [] for k in names if k in eval_names or k == "grand"}
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                for model in runs_models if eval_names else []:
                    out = eval_metrics(model(x), labels, eval_names)
                    for k, v in out.items():
                        per_run[k].append(v.float().cpu())
            for model in init_models:
                per_run["grand"].append(grand_scores(model, x, labels, cfg.grand_params).float().cpu())
            vals = {}
            for k, lst in per_run.items():
                stack = torch.stack(lst)
                masked = get_kind(k).needs_labels and needs_labels
                vals[k] = (torch.where(valid.cpu(), stack.mean(0), torch.nan) if masked else stack.mean(0)).numpy()
                if multi:
                    vals[k + "_std"] = (torch.where(valid.cpu(), stack.std(0), torch.nan) if masked else stack.std(0)).numpy()
                    vals[k + "__runs"] = stack.T.numpy()
            return vals

        def finish(sidx: int, base: dict, rows: np.ndarray, vals: dict, shard_error) -> None:
            nrows = len(base["sample_id"])
            cols = _assemble(rows, vals, nrows, names, train_stats, sidx, multi)
            if embed is not None:
                cols.update(embed.columns(sidx, nrows))
            st = write(sidx, base, cols, shard_error)
            emit("shard", {"index": sidx, **st, "timings": asdict(t), "elapsed": time.perf_counter() - t_start})

        run_stream(p, todo, Preprocess(p.image_size, False, cfg.max_pixels), cuda, compute, finish, t)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    result = {"out": cfg.out, "metrics": names, **counts, "reasons": reasons, "timings": asdict(t),
              "seconds": round(time.perf_counter() - t_start, 3), "shards_done_before": len(finished), "image_size": p.image_size,
              "device": str(device)}
    if multi and rank == 0:
        result["reliability"] = _reliability(cfg.out, names)
        meta = read_table_meta(cfg.out)
        meta["reliability"] = result["reliability"]
        write_table_meta(cfg.out, meta)
    return result


def get_kind(name):
    from .metrics import get_metric

    return get_metric(name)


def run_stream(p: Plan, shards: list, pre: Preprocess, cuda: bool, compute, finish, t: Timings, hashes: bool = False) -> None:
    """Stream ``shards`` through DataLoader workers: ``compute(batch)`` → per-row arrays for the ok
    samples of a batch; ``finish(shard_index, base_columns, rows, values, shard_error)`` once per
    shard, with the values of all its batches concatenated in row order."""
    cfg = p.cfg
    stream = EvalStream(p.source.spec(), shards, pre, cfg.batch_size, cfg.on_error, hashes=hashes,
                        num_classes=p.num_classes if any(m.needs_labels for m in p.metrics) else 0)
    workers = min(cfg.workers, len(shards)) if shards else 0
    acc: dict[int, dict[str, list]] = {}
    t_wait = time.perf_counter()
    for batch in loader(stream, workers, None, cuda):
        check_stop()
        if "fatal" in batch:
            from . import errors

            name, msg, reason = batch["fatal"]
            cls = getattr(errors, name, errors.DataPruneError)
            raise cls(msg, reason=reason) if reason is not None and cls in (errors.SourceError, errors.DecodeError) else cls(msg)
        t.read += time.perf_counter() - t_wait
        t.decode += batch["read_s"]
        sidx = int(batch["shard"])
        a = acc.setdefault(sidx, {"rows": [], "vals": {}})
        if len(batch["rows"]):
            t0 = time.perf_counter()
            for k, v in compute(batch).items():
                a["vals"].setdefault(k, []).append(v)
            a["rows"].append(batch["rows"].numpy())
            t.compute += time.perf_counter() - t0
        if batch["done"]:
            t0 = time.perf_counter()
            a = acc.pop(sidx)
            rows = np.concatenate(a["rows"]) if a["rows"] else np.zeros(0, np.int64)
            vals = {k: np.concatenate(v) for k, v in a["vals"].items()}
            finish(sidx, batch["base"].value, rows, vals, batch.get("shard_error"))
            t.write += time.perf_counter() - t0
        t_wait = time.perf_counter()


def _assemble(rows: np.ndarray, vals: dict, nrows: int, names, train_stats, sidx: int, multi: bool) -> dict[str, np.ndarray]:
    """Per-shard metric columns: NaN for rows that were not scored."""
    cols: dict[str, np.ndarray] = {}
    for k, v in vals.items():
        arr = np.full((nrows,) + v.shape[1:], np.nan, np.float32)
        arr[rows] = v
        cols[k] = arr
    if train_stats is not None:
        ok = np.zeros(nrows, bool)
        ok[rows] = True
        for k in names:
            if k in ("forgetting", "aum"):
                mean, std, per_run = train_stats.values(k, sidx, nrows)
                cols[k] = np.where(ok, mean, np.nan).astype(np.float32)
                if multi:
                    cols[k + "_std"] = np.where(ok, std, np.nan).astype(np.float32)
                    cols[k + "__runs"] = np.where(ok[:, None], per_run, np.nan).astype(np.float32)
    for k in names:
        if get_kind(k).kind != "embed":
            cols.setdefault(k, np.full(nrows, np.nan, np.float32))
    return cols


def _reliability(out: str, names) -> dict[str, float]:
    """Spearman correlation between the means of two halves of the runs, per metric."""
    import glob

    rel = {}
    stats = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, DONE_DIR, "part-*.json")))]
    for k in names:
        chunks = [np.asarray(s["runs"][k], dtype=np.float64) for s in stats if s.get("runs", {}).get(k)]
        if not chunks:
            continue
        m = np.concatenate(chunks)
        m = m[~np.isnan(m).any(1)]
        if m.shape[0] < 3 or m.shape[1] < 2:
            continue
        a, b = m[:, 0::2].mean(1), m[:, 1::2].mean(1)
        rel[k] = round(spearman(a, b), 4)
    return rel


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing the mean of their ranks (as scipy.stats.rankdata, minus 1)."""
    order = np.argsort(a, kind="stable")
    s = a[order]
    start = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(start) - 1
    first = np.flatnonzero(start)
    last = np.r_[first[1:], len(s)] - 1
    ranks = np.empty(len(a), np.float64)
    ranks[order] = ((first + last) / 2.0)[group]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = average_ranks(np.asarray(a)), average_ranks(np.asarray(b))
    ra -= ra.mean()
    rb -= rb.mean()
    d = math.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / d) if d else float("nan")
