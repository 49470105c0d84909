"""Every command's options as one frozen dataclass, each default written once.

The CLI's options default to None and take these defaults (``from_options``); the library takes
the same objects. ``validate()`` checks numbers and small fixed vocabularies; names that come from a
registry (metrics, writers, selection strategies) are checked by that registry, where the list of
valid names lives.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .distributed import dist_info
from .errors import ConfigError, OnError

DEFAULT_WORKDIR = "dataprune-out"
DEFAULT_SCORES = os.path.join(DEFAULT_WORKDIR, "scores")
DEFAULT_MANIFEST = os.path.join(DEFAULT_WORKDIR, "manifest.parquet")
DEFAULT_EXPORT = os.path.join(DEFAULT_WORKDIR, "export")
DEFAULT_CURVE = os.path.join(DEFAULT_WORKDIR, "curve")
DEFAULT_REPORT = os.path.join(DEFAULT_WORKDIR, "report")

SCHEDULES = ("cosine", "step")
GRAND_PARAMS = ("all", "head")
DEDUP_KEEPS = ("easy", "hard", "random")
TEXT_KEEPS = ("first", "longest", "random")  # text-dedup's keeper per group (dataprune.metrics.textdedup)
DEDUP_RULES = ("greedy", "semdedup", "components")  # see dataprune.metrics.keepers
KMEANS_BACKENDS = ("auto", "torch", "faiss")
DECODE_MODES = ("auto", "cpu", "cuda")
QUOTAS = ("proportional", "equal")
JOINS = ("inner", "strict")
NAN_POLICIES = ("error", "drop")
DIRECTIONS = ("higher-is-harder", "higher-is-easier")  # a foreign score file's meaning (select --direction)
SELECT_MEMORY_FRACTION = 0.5  # select streams when its in-memory estimate exceeds this share of RAM

# Bounds of the numeric options, each written once: beyond them a value is a mistake that would end in
# a traceback or an absurd allocation (a 100000-px batch, a 10^9-class head, 10^9 CCS strata).
MAX_BATCH = 65_536
MAX_WORKERS = 256
MAX_IMAGE_SIZE = 4096
MAX_BATCH_PIXELS = 1 << 32  # batch × image_size², ~51 GB of float32 pixels
MAX_EPOCHS = 10_000  # curve: also the epochs a small fraction trains (epochs / fraction)
MAX_RUNS = 100
MAX_CLASSES = 1_000_000
MAX_PIXELS = 1 << 31  # --max-pixels: a 2-gigapixel image is 6 GB of RGB
MAX_SHUFFLE_BUFFER = 1_000_000
MAX_CLUSTERS = 1_000_000
MAX_KMEANS_ITERS = 10_000
MAX_STRATA = 10_000
MAX_REPEATS = 100
MAX_COUNT = (1 << 63) - 1
MAX_TRAIN_SEED = (1 << 32) - 1  # torch and the shuffles derive their seeds from it by multiplication
MAX_SEED = (1 << 64) - 1  # select / export hash (sample_id, seed) in 64 bits


def check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """``value`` is an integer in [low, high] (an option's bounds; ``high`` None = no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ConfigError(f"{name} must be an integer in [{low:,}, {'∞' if high is None else f'{high:,}'}], not {value!r}")


def check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> None:
    """``value`` is a finite number inside the interval (open at the ends flagged so)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(f"{name} must be a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, "
                          f"not {value!r}")


def from_options(cls, **options):
    """``cls(**options)`` leaving out the options given as None, so they take the dataclass default
    (an option whose default is itself None stays None either way)."""
    return cls(**{k: v for k, v in options.items() if v is not None})


def default(cls, name: str) -> Any:
    """The default of one field (for help texts)."""
    for f in fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


# ------------------------------------------------------------------------------------------- score

@dataclass(frozen=True)
class ScoreConfig:
    data: str
    metrics: tuple[str, ...] = ("el2n",)
    out: str = DEFAULT_SCORES
    format: str | None = None
    source_options: dict = field(default_factory=dict)
    model: str | None = None  # None: resnet18, or for embedding-only runs without --checkpoint DEFAULT_ENCODER (pretrained)
    pretrained: bool = False
    checkpoint: str | None = None
    num_classes: int | None = None
    device: str = "auto"
    batch_size: int = 128
    workers: int | None = None  # None: engine.planning.auto_workers (decided from the cores and the image size)
    image_size: int | None = None
    epochs: int | None = None  # None: see engine.planning.resolve_defaults
    score_epoch: int | None = None
    runs: int = 1
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    shuffle_buffer: int = 2000
    grand_params: str = "all"
    seed: int = 0
    on_error: str = OnError.DEFAULT
    max_pixels: int | None = None
    overwrite: bool = False
    clusters: int | None = None  # k-means k (None: number of classes, else round(sqrt(N/2)))
    kmeans_iters: int = 20
    kmeans_sample: int | None = 200_000  # fit k-means on at most this many rows (seeded), then assign all
    kmeans_backend: str = "auto"
    dedup_eps: float = 0.05  # semantic duplicates: cosine similarity ≥ 1 - eps
    dedup_keep: str | None = None  # None: hard for dedup (SemDeDup: farthest from its centroid), first for text-dedup
    dedup_rule: str = "greedy"  # greedy | semdedup | components (dataprune.metrics.keepers)
    ngram: int = 5  # text-dedup: word n-gram shingles (Lee et al. 2022)
    num_perm: int = 256  # text-dedup: MinHash permutations
    threshold: float = 0.8  # text-dedup: near copies have estimated Jaccard ≥ this (and set the LSH bands)
    min_span: int = 50  # text-substr: repeated spans of at least this many whitespace tokens
    cache_dir: str | None = None  # embedding cache (None: OUT/_embeddings)
    keep_artifacts: bool = False  # keep the resume checkpoints (OUT/.train) once the table is complete
    decode: str = "auto"  # where JPEGs are decoded: auto (the GPU when the model runs on CUDA) | cpu | cuda
    exact_decode: bool = False  # decode every image at full resolution (no reduced DCT scale before the resize)

    def validate(self) -> None:
        """Numbers and fixed vocabularies, once defaults are resolved (epochs and workers are ints)."""
        OnError(self.on_error)
        check_int("--batch-size", self.batch_size, 1, MAX_BATCH)
        check_int("--workers", self.workers, 0, MAX_WORKERS)
        check_int("--runs", self.runs, 1, MAX_RUNS)
        check_int("--epochs", self.epochs, 0, MAX_EPOCHS)
        if self.score_epoch is not None and not (isinstance(self.score_epoch, int) and 1 <= self.score_epoch <= self.epochs):
            raise ConfigError("--score-epoch must be between 1 and --epochs")
        check_float("--lr", self.lr, 0, math.inf, low_open=True, high_open=True)
        check_float("momentum", self.momentum, 0, 1, low_open=True, high_open=True)  # Nesterov SGD needs one
        check_float("--weight-decay", self.weight_decay, 0, math.inf, high_open=True)
        if self.grand_params not in GRAND_PARAMS:
            raise ConfigError("--grand-params must be 'all' or 'head'")
        if self.schedule not in SCHEDULES:
            raise ConfigError("--schedule must be 'cosine' or 'step'")
        if self.image_size is not None:
            check_int("--image-size", self.image_size, 8, MAX_IMAGE_SIZE)
            self.check_batch(self.image_size)
        check_int("--shuffle-buffer", self.shuffle_buffer, 1, MAX_SHUFFLE_BUFFER)
        check_int("--seed", self.seed, 0, MAX_TRAIN_SEED)
        if self.max_pixels is not None:
            check_int("--max-pixels", self.max_pixels, 1, MAX_PIXELS)
        if self.num_classes is not None:
            check_int("--num-classes", self.num_classes, 1, MAX_CLASSES)
        if self.dedup_keep is not None and self.dedup_keep not in DEDUP_KEEPS + TEXT_KEEPS[:2]:
            raise ConfigError(f"--dedup-keep must be {', '.join(DEDUP_KEEPS)} (dedup) or {', '.join(TEXT_KEEPS)} (text-dedup)")
        if self.dedup_rule not in DEDUP_RULES:
            raise ConfigError(f"--dedup-rule must be {', '.join(DEDUP_RULES[:-1])} or {DEDUP_RULES[-1]}")
        check_float("--eps", self.dedup_eps, 0, 1, low_open=True, high_open=True)
        if self.kmeans_backend not in KMEANS_BACKENDS:
            raise ConfigError(f"--kmeans-backend must be {', '.join(KMEANS_BACKENDS[:-1])} or {KMEANS_BACKENDS[-1]}")
        if self.clusters is not None:
            check_int("--clusters", self.clusters, 1, MAX_CLUSTERS)
        check_int("--kmeans-iters", self.kmeans_iters, 0, MAX_KMEANS_ITERS)
        if self.kmeans_sample is not None:
            check_int("--kmeans-sample", self.kmeans_sample, 1, MAX_COUNT)
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"--decode must be {', '.join(DECODE_MODES[:-1])} or {DECODE_MODES[-1]}, not {self.decode!r}")
        if self.decode == "cuda":
            import torch

            if self.device == "cpu" or not torch.cuda.is_available():
                raise ConfigError("--decode cuda decodes JPEGs on the GPU the model runs on, and no CUDA device is in use here "
                                  f"(--device {self.device}); use --decode auto or cpu")

    def check_batch(self, image_size: int) -> None:
        """A batch of ``--batch-size`` images of ``image_size`` px (the size given, or the one the plan chose)."""
        if self.batch_size * image_size * image_size > MAX_BATCH_PIXELS:
            gb = self.batch_size * image_size * image_size * 12 / 1e9
            raise ConfigError(f"a batch of {self.batch_size} images of {image_size} px would take {gb:,.0f} GB of pixels; "
                              "lower --batch-size or --image-size")

    def fingerprint_fields(self) -> dict[str, Any]:
        """What makes two runs produce the same table (not where it goes or how fast it runs)."""
        d = asdict(self)
        drop = ["out", "device", "decode", "overwrite", "on_error", "cache_dir", "keep_artifacts", "checkpoint"]  # checkpoint: by its hash
        if not self.epochs:
            drop += ["batch_size", "workers"]  # they change the training data order, nothing else
        elif (world := dist_info()[1]) > 1:
            d["world_size"] = world  # ranks train together on their own shards: another data order
        for k in drop:
            d.pop(k)
        d["data"] = self.data if "://" in self.data or "{" in self.data else os.path.abspath(self.data)
        d["metrics"] = sorted(d["metrics"])
        return d


# ------------------------------------------------------------------------------------------ select

@dataclass(frozen=True)
class SelectConfig:
    by: tuple[str, ...] = ()  # metric column(s); empty = the only metric of the inputs
    keep: str | None = None  # hard | easy | random (None: hard; must stay None for --strategy ccs)
    frac: float | None = None
    count: int | None = None
    strategy: str = "plain"
    class_balanced: bool = False
    class_quota: str = "proportional"
    ccs_beta: float = 0.0  # opt-in here; `curve` runs CCS at the paper's β (CurveConfig.ccs_beta)
    ccs_strata: int = 50
    drop_hardest: float = 0.0
    dedup: bool = False
    min_score: float | None = None
    max_score: float | None = None
    nan: str = "error"
    join: str = "inner"
    seed: int = 0
    direction: str = "higher-is-harder"  # foreign score files without a :harder/:easier suffix
    expect_rows: int | None = None  # foreign files: rows to expect (None: 1,281,167 for ImageNet-1K_*.csv, else any)
    memory_limit: int | None = None  # bytes; above it select streams (None: SELECT_MEMORY_FRACTION of RAM)

    @property
    def keep_mode(self) -> str:
        """The registered selection strategy this config runs (``select.strategies``)."""
        return "ccs" if self.strategy == "ccs" else (self.keep or "hard")

    def validate(self) -> None:
        """Numbers and fixed vocabularies; ``--keep``/``--strategy`` names and their combinations with
        the other options are checked by the strategy registry (``select.strategies.check``)."""
        if (self.frac is None) == (self.count is None):
            raise ConfigError("give exactly one of --frac F (fraction of the rows to keep) or --count N")
        if self.frac is not None and not (isinstance(self.frac, (int, float)) and 0 < self.frac <= 1):
            raise ConfigError(f"--frac must be in (0, 1], not {self.frac}")
        if self.count is not None:
            check_int("--count", self.count, 1, MAX_COUNT)
        if self.class_quota not in QUOTAS:
            raise ConfigError(f"--class-quota must be one of {', '.join(QUOTAS)}, not {self.class_quota!r}")
        if self.class_quota != "proportional" and not self.class_balanced:
            raise ConfigError("--class-quota needs --class-balanced")
        if not 0 <= self.drop_hardest < 1:
            raise ConfigError(f"--drop-hardest must be in [0, 1), not {self.drop_hardest}")
        if not 0 <= self.ccs_beta < 1:
            raise ConfigError(f"--ccs-beta must be in [0, 1), not {self.ccs_beta}")
        check_int("--ccs-strata", self.ccs_strata, 1, MAX_STRATA)
        check_int("--seed", self.seed, 0, MAX_SEED)
        if self.nan not in NAN_POLICIES:
            raise ConfigError(f"--nan must be one of {', '.join(NAN_POLICIES)}, not {self.nan!r}")
        if self.join not in JOINS:
            raise ConfigError(f"--join must be one of {', '.join(JOINS)}, not {self.join!r}")
        for name, v in (("--min-score", self.min_score), ("--max-score", self.max_score)):
            if v is not None and math.isnan(v):
                raise ConfigError(f"{name} must be a number")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ConfigError(f"--min-score {self.min_score} is above --max-score {self.max_score}")
        if len(set(self.by)) != len(self.by) or any(not b for b in self.by):
            raise ConfigError(f"--by lists each metric once, separated by commas (got {','.join(self.by)!r})")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"--direction must be one of {', '.join(DIRECTIONS)}, not {self.direction!r}")
        if self.expect_rows is not None:
            check_int("--expect-rows", self.expect_rows, 0)
        if self.memory_limit is not None:
            check_int("--memory-limit", self.memory_limit, 1)


# ------------------------------------------------------------------------------------------ export

WRITER_ALIASES = {"webdataset": "wds"}  # other tools' words for a writer (img2dataset's --output_format webdataset)
MAX_SHARD_SAMPLES = 10_000  # the most samples an output shard holds when --shard-size is not given
LOADER_SHARDS = 16  # ... and the fewest shards it then cuts (when there are that many samples)


@dataclass(frozen=True)
class ExportConfig:
    to: str = "wds"  # a writer name, or an alias of one (WRITER_ALIASES: stored as the writer's own name)
    out: str = DEFAULT_EXPORT
    shard_size: int | None = None  # samples per output shard/file; None: shard_plan (at least 16 balanced shards)
    max_shard_bytes: int | None = None
    shuffle: bool = False
    seed: int = 0
    on_error: str = OnError.DEFAULT
    prefix: str = "pruned"
    jobs: int = 1  # processes writing output shards (shard i by job i mod jobs); under torchrun: the ranks;
    # 0: auto (the CLI's default) — by the selected bytes and the usable CPUs (export.parallel.auto_jobs)
    timeout: float = 1800.0  # seconds a rank (or the parent of --jobs) waits for the others at one step

    def __post_init__(self) -> None:
        if isinstance(self.to, str) and self.to in WRITER_ALIASES:
            object.__setattr__(self, "to", WRITER_ALIASES[self.to])

    def shard_plan(self, n: int) -> tuple[int, int]:
        """Output shards for ``n`` samples as ``(q, r)``: shard ``i`` holds at most ``q + (i < r)`` samples.

        An explicit ``--shard-size`` is ``(shard_size, 0)``. Left unset, the ``n`` samples go into
        ``S = min(n, max(16, ceil(n / 10000)))`` shards whose sizes differ by at most one
        (``q, r = divmod(n, S)``): at least 16 shards, so a ``DataLoader`` over ``webdataset`` (which
        hands whole shards to its workers) keeps up to 16 workers busy with equal work, and never
        more than 10,000 samples a shard (fewer than 16 samples: one shard each). Shard ``i`` is fixed rows
        of the export's order (``export.base.plan_parts``), skips or not: any process can write it alone."""
        if self.shard_size is not None:
            return self.shard_size, 0
        if n <= 0:
            return MAX_SHARD_SAMPLES, 0
        shards = min(n, max(LOADER_SHARDS, -(-n // MAX_SHARD_SAMPLES)))
        return divmod(n, shards)

    def validate(self) -> None:
        """Numbers and names; ``--to`` is checked by the writer registry (``export.base.writer_class``)."""
        if self.shard_size is not None:
            check_int("--shard-size", self.shard_size, 1, MAX_COUNT)
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1024:
            raise ConfigError("--max-shard-bytes must be at least 1024")
        check_int("--seed", self.seed, 0, MAX_SEED)
        OnError(self.on_error)
        check_int("--jobs", self.jobs, 0, MAX_WORKERS)
        check_float("--timeout", self.timeout, 1, 7 * 86400)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix):
            raise ConfigError("--prefix may only contain letters, digits, '_', '-' and '.'")


# ------------------------------------------------------------------------------------------- curve

@dataclass(frozen=True)
class CurveConfig:
    train: str
    test: str
    scores: str = DEFAULT_SCORES
    fracs: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4, 0.2, 0.1)
    keeps: tuple[str, ...] = ("hard", "easy", "random", "ccs")
    by: str | None = None
    repeats: int = 1
    out: str = DEFAULT_CURVE
    same_epochs: bool = False
    epochs: int = 10  # at fraction 1.0 (fraction f trains epochs / f unless same_epochs)
    ccs_beta: float = 0.1  # the CCS arm at the paper's setting (Zheng et al. 2023); `select` leaves it opt-in
    class_balanced: bool = False
    score: dict = field(default_factory=dict)  # ScoreConfig fields for training (model, lr, batch_size, ...)
    overwrite: bool = False  # discard finished units made with other settings

    def validate(self) -> None:
        """Numbers; the ``--keep`` names are checked by the strategy registry."""
        if not self.fracs or any(not 0 < f <= 1 for f in self.fracs):
            raise ConfigError("--fracs must be fractions in (0, 1]")
        check_int("--repeats", self.repeats, 1, MAX_REPEATS)
        check_int("--epochs", self.epochs, 1, MAX_EPOCHS)
        if not self.same_epochs and self.epochs / min(self.fracs) > MAX_EPOCHS + 0.5:
            raise ConfigError(f"--fracs {min(self.fracs):g} would train {self.epochs / min(self.fracs):,.0f} epochs (--epochs / fraction), "
                              f"more than {MAX_EPOCHS:,}; raise the smallest fraction or use --same-epochs")
        if not 0 <= self.ccs_beta < 1:
            raise ConfigError("--ccs-beta must be in [0, 1)")

    def train_epochs(self, frac: float) -> int:
        """Epochs of the unit that keeps ``frac``: the same optimisation steps as at 1.0 unless --same-epochs."""
        return self.epochs if self.same_epochs else max(1, int(round(self.epochs / frac)))


# ------------------------------------------------------------------------------------------ report

MAX_THUMB = 512


@dataclass(frozen=True)
class ReportConfig:
    scores: str = DEFAULT_SCORES
    out: str = DEFAULT_REPORT
    manifest: str | None = None  # a selection's manifest: kept/dropped per class, score ranges, CCS strata
    curve: str | None = None  # the --out of `dataprune curve` (curve.parquet or curve.csv)
    by: tuple[str, ...] | None = None  # metric columns to show (default: every metric of the table)
    k: int = 8  # hardest / easiest thumbnails per class and metric
    max_classes: int = 10  # classes with thumbnail grids per metric (above: the hardest classes by median)
    suspects: int = 48  # label-noise suspects shown
    dup_groups: int = 24  # duplicate groups shown
    thumb_size: int = 96  # longest side of a thumbnail, px

    def validate(self) -> None:
        check_int("--k", self.k, 1, 100)
        check_int("--max-classes", self.max_classes, 1, 1000)
        check_int("--suspects", self.suspects, 0, 5000)
        check_int("--dup-groups", self.dup_groups, 0, 1000)
        check_int("--thumb-size", self.thumb_size, 16, MAX_THUMB)
        if self.by is not None and (not self.by or not all(isinstance(b, str) and b for b in self.by)):
            raise ConfigError("--by needs metric column names, e.g. --by el2n or --by el2n,forgetting")
