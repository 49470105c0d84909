"""The streaming tools every pass over the data shares (scoring, embedding, training, evaluation).

``run_stream(spec, shards, compute, finish, t)`` streams shards through DataLoader workers: each
worker rebuilds the source from ``spec`` (small and picklable), reads, decodes and resizes one shard
at a time, and yields batches that never mix shards; the last batch of a shard carries the base
columns of every sample in it (skipped ones with their reason).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import DecodeError, OnError, SourceError, check_stop
from ..tables import RowBuffer, mark_bad_label
from .preprocess import NATIVE_MAX, Preprocess  # noqa: F401  (the streaming tools' preprocessing, re-exported)

def _worker_init(_):
    import torch

    torch.set_num_threads(1)


def worker_shards(shards: list) -> tuple[list, int, int]:
    """The shards this DataLoader worker handles (of those given to its rank), and the worker id/count."""
    import torch.utils.data as tud

    info = tud.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    return shards[wid::nw], wid, nw


@dataclass(frozen=True)
class StreamSpec:
    """What a pass over the data needs, small and picklable (workers rebuild the source from it)."""

    source: dict  # Source.spec()
    pre: Preprocess
    batch_size: int
    workers: int
    on_error: str = "skip"
    num_classes: int = 0  # > 0: labels outside [0, num_classes) are skipped as bad_label
    hashes: bool = False  # also return blake2b-64 hashes of each image's bytes and decoded pixels
    pin: bool = False  # pin host memory (CUDA): the model runs on a CUDA device
    decode: str = "auto"  # where JPEGs are decoded: auto | cpu | cuda (ScoreConfig.decode; run_stream resolves auto)
    exact_decode: bool = False  # decode at full resolution (no reduced DCT scale; ScoreConfig.exact_decode)


@dataclass(frozen=True)
class GpuJpeg:
    """A JPEG a worker hands over undecoded (--decode cuda): its bytes, EXIF orientation and place."""

    data: bytes
    orientation: int
    where: str


class EvalStream:
    """IterableDataset of per-shard batches: ``{"shard", "rows", "images", "labels", "done", "base", ...}``.

    Batches never mix shards; the last batch of a shard has ``done=True`` and carries the base
    columns of every sample in the shard (skipped ones included, with their reason)."""

    def __init__(self, spec: StreamSpec, shards: list):
        self.spec, self.shards = spec, shards

    def __iter__(self):
        from ..errors import DataPruneError

        try:
            yield from self._iter()
        except DataPruneError as e:  # hand the error to the main process whole (no worker traceback)
            yield {"fatal": (type(e).__name__, str(e), getattr(e, "reason", None))}

    def _iter(self):
        from ..decode import DEFAULT_MAX_PIXELS, DecodeStats, decode_image, gpu_jpeg
        from ..sources import source_from_spec

        spec, pre, policy = self.spec, self.spec.pre, OnError(self.spec.on_error)
        mine, _, _ = worker_shards(self.shards)
        source = source_from_spec(spec.source)
        max_pixels = pre.max_pixels or DEFAULT_MAX_PIXELS
        # reduced-scale decode unless asked not to, or when hashing pixels (exact duplicates = the same full-size pixels)
        min_side = None if spec.exact_decode or spec.hashes else pre.decode_min_side
        gpu = spec.decode == "cuda"  # resolved by run_stream: hand JPEGs the GPU takes over undecoded
        if spec.hashes:
            from ..metrics.dedup import bytes_hash, pixel_hash
        for shard in mine:
            base, stats = RowBuffer(), DecodeStats()
            imgs, rows, labels, hb, hp = [], [], [], [], []
            t_read = 0.0
            t0 = time.perf_counter()
            shard_error = None
            try:
                for s in source.iter_samples(shard):
                    row = len(base)
                    mark_bad_label(s)
                    if s.ok and spec.num_classes and s.label is not None and not 0 <= s.label < spec.num_classes:
                        s.status = "bad_label"
                        s.error = f"{s.loc_path}: sample {s.key!r}: label {s.label} is outside 0..{spec.num_classes - 1}"
                    if s.ok:
                        try:
                            orientation = gpu_jpeg(s.image, max_pixels) if gpu else None
                            if orientation is not None:
                                imgs.append(GpuJpeg(s.image, orientation, f"{s.loc_path}: sample {s.key!r}"))
                            else:
                                arr = decode_image(s.image, max_pixels, min_side, stats, view=not pre.train)
                                imgs.append(pre(arr))
                            rows.append(row)
                            labels.append(-1 if s.label is None else s.label)
                            if spec.hashes:
                                hb.append(bytes_hash(s.image))
                                hp.append(pixel_hash(arr))
                        except DecodeError as e:
                            s.status, s.error = e.reason, f"{s.loc_path}: sample {s.key!r}: {e}"
                    if not s.ok:
                        policy.sample(s)
                    base.add(s)
                    if len(imgs) == spec.batch_size:
                        t_read += time.perf_counter() - t0
                        yield self._batch(shard, imgs, rows, labels, t_read, hb, hp)
                        imgs, rows, labels, hb, hp, t_read = [], [], [], [], [], 0.0
                        t0 = time.perf_counter()
            except SourceError as e:
                policy.shard(e)
                shard_error = (e.reason, str(e))
            t_read += time.perf_counter() - t0
            b = self._batch(shard, imgs, rows, labels, t_read, hb, hp)
            b.update(done=True, base=Opaque(base.cols), shard_error=shard_error, decode_stats=stats.as_dict())
            yield b

    @staticmethod
    def _batch(shard, imgs, rows, labels, t_read, hb, hp):
        import torch

        jpegs = [(i, x) for i, x in enumerate(imgs) if isinstance(x, GpuJpeg)]
        return {
            "hashes": [hb, hp],
            "shard": shard.index,
            "images": _stack([x for x in imgs if not isinstance(x, GpuJpeg)] if jpegs else imgs),
            "gpu": Opaque(jpegs) if jpegs else None,
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


_WRAPPER = None


def _wrapper_class():
    """``IterableWrapper(obj)``: a torch IterableDataset iterating ``obj``. Made on first use (torch
    stays out of module import) but reachable by name through the module's ``__getattr__``, so
    DataLoader workers started with spawn or forkserver can unpickle it."""
    global _WRAPPER
    if _WRAPPER is None:
        import torch.utils.data as tud

        class IterableWrapper(tud.IterableDataset):
            def __init__(self, obj):
                self.obj = obj

            def __iter__(self):
                return iter(self.obj)

        IterableWrapper.__module__, IterableWrapper.__qualname__ = __name__, "IterableWrapper"
        _WRAPPER = IterableWrapper
    return _WRAPPER


def __getattr__(name: str):
    if name == "IterableWrapper":
        return _wrapper_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_iterable(obj):
    """Wrap a plain iterable class as a torch IterableDataset."""
    return _wrapper_class()(obj)


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


class Normalizer:
    """uint8 batch (on the host, pinned on CUDA) → float32 model input on ``device``, normalised with
    the model's mean/std: one copy into a float buffer the normaliser keeps, then one fused
    ``x * (1 / (255 std)) + (−mean / std)`` in place (``torch.addcmul``). The old three passes
    (``.float()``, subtract, divide, each into a new tensor) took 0.64 ms an image at 224 px on this
    project's 2-core CPU, this 0.16 ms (a bare uint8 → float copy: 0.03; 3.4× less again under a load
    of 5: 1.89 → 0.56 ms; benchmarks/bench_score.py --normalise). Folding mean/std into
    the first convolution instead is not exact: its zero padding would then pad raw pixels.
    The returned tensor is valid until the next call (the buffer is reused: every caller consumes
    a batch before asking for the next)."""

    def __init__(self, mean, std, device, channels_last: bool):
        import torch

        inv = 1.0 / (torch.tensor(std, dtype=torch.float64) * 255)
        self.scale = inv.float().view(1, 3, 1, 1).to(device)
        self.shift = (-torch.tensor(mean, dtype=torch.float64) * 255 * inv).float().view(1, 3, 1, 1).to(device)
        self.device, self.channels_last = device, channels_last
        self.buf = None

    def __call__(self, images):
        import torch

        x = images.to(self.device, non_blocking=True)
        n, fmt = x.shape[0], torch.channels_last if self.channels_last else torch.contiguous_format
        if self.buf is None or self.buf.shape[1:] != x.shape[1:] or self.buf.shape[0] < n:
            self.buf = torch.empty(x.shape, dtype=torch.float32, device=self.device, memory_format=fmt)
        out = self.buf[:n]
        out.copy_(x)
        return torch.addcmul(self.shift, out, self.scale, out=out)


@dataclass
class Timings:
    read: float = 0.0  # time the main loop waited for data
    decode: float = 0.0  # time workers spent reading + decoding (summed over workers)
    compute: float = 0.0
    write: float = 0.0
    decode_paths: dict = field(default_factory=dict)  # decode.DecodeStats of the pass, summed over workers


def _reraise(fatal) -> None:
    """An error a worker handed over as a record: raised again here as the same class."""
    from .. import errors

    name, msg, reason = fatal
    cls = getattr(errors, name, errors.DataPruneError)
    raise cls(msg, reason=reason) if reason is not None and cls in (errors.SourceError, errors.DecodeError) else cls(msg)


def run_stream(spec: StreamSpec, shards: list, compute, finish, t: Timings) -> None:
    """Stream ``shards`` through DataLoader workers: ``compute(batch)`` → per-row arrays for the ok
    samples of a batch; ``finish(shard_index, base_columns, rows, values, shard_error)`` once per
    shard, with the values of all its batches concatenated in row order."""
    from ..decode import DecodeStats
    from ..decode.cuda import use_gpu_decode

    spec = replace(spec, decode="cuda" if use_gpu_decode(spec.decode, spec.pin, spec.hashes) else "cpu")
    workers = min(spec.workers, len(shards)) if shards else 0
    acc: dict[int, dict[str, list]] = {}
    paths = DecodeStats()
    t_wait = time.perf_counter()
    for batch in loader(EvalStream(spec, shards), workers, None, spec.pin):
        check_stop()
        if "fatal" in batch:
            _reraise(batch["fatal"])
        t.read += time.perf_counter() - t_wait
        t.decode += batch["read_s"]
        sidx = int(batch["shard"])
        a = acc.setdefault(sidx, {"rows": [], "vals": {}, "skips": []})
        if batch.get("gpu") is not None:
            t0 = time.perf_counter()
            _decode_on_gpu(batch, spec, a["skips"], paths)
            t.decode += time.perf_counter() - t0
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
            base = batch["base"].value
            for row, reason, msg in a["skips"]:  # JPEGs neither the GPU nor the CPU could decode
                base["status"][row], base["error"][row] = reason, msg
            paths.merge(batch["decode_stats"])
            t.decode_paths = paths.as_dict()
            finish(sidx, base, rows, vals, batch.get("shard_error"))
            t.write += time.perf_counter() - t0
        t_wait = time.perf_counter()


def _decode_on_gpu(batch: dict, spec: StreamSpec, skips: list, paths, device=None) -> None:
    """``batch["images"]`` put together on the current CUDA device (decode.cuda.assemble); the JPEGs
    that neither the GPU nor the CPU could decode leave the batch, recorded in ``skips`` as (row,
    reason, message) — or raised under --on-error raise."""
    import torch

    from ..decode import DEFAULT_MAX_PIXELS, decode_image
    from ..decode.cuda import assemble

    pre, jpegs = spec.pre, batch["gpu"].value
    max_pixels, min_side = pre.max_pixels or DEFAULT_MAX_PIXELS, None if spec.exact_decode else pre.decode_min_side
    images, failed = assemble(jpegs, batch["images"], len(batch["rows"]), pre.size, pre.eval_tensor,
                              lambda data: _stack([pre(decode_image(data, max_pixels, min_side, paths))])[0], paths, device)
    keep = torch.ones(len(batch["rows"]), dtype=torch.bool)
    for i, e in failed:
        msg = f"{jpegs[i][1].where}: {e}"
        if spec.on_error == "raise":
            raise DecodeError(msg, reason=e.reason)
        keep[jpegs[i][0]] = False
        skips.append((int(batch["rows"][jpegs[i][0]]), e.reason, msg))
    batch["images"], batch["rows"], batch["labels"] = images[keep.to(images.device)], batch["rows"][keep], batch["labels"][keep]
