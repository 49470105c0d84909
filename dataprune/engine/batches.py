"""The streaming tools every pass over the data shares (scoring, embedding, training, evaluation).

``run_stream(spec, shards, compute, finish, t)`` streams shards through DataLoader workers: each
worker rebuilds the source from ``spec`` (small and picklable), reads, decodes and resizes one shard
at a time, and yields batches that never mix shards; the last batch of a shard carries the base
columns of every sample in it (skipped ones with their reason).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..errors import DecodeError, OnError, SourceError, check_stop
from ..tables import RowBuffer, mark_bad_label

NATIVE_MAX = 64  # images no larger than this are scored at their own size when --image-size is not given


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

            from ..decode import to_tensor

            x = TF.center_crop(TF.resize(to_tensor(arr), s, antialias=True), [s, s])
            return np.ascontiguousarray(x.permute(1, 2, 0).numpy())
        import torch
        import torchvision.transforms.v2.functional as TF

        from ..decode import to_tensor

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
    pin: bool = False  # pin host memory (CUDA)


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
        from ..decode import DEFAULT_MAX_PIXELS, decode_image
        from ..sources import source_from_spec

        spec, pre, policy = self.spec, self.spec.pre, OnError(self.spec.on_error)
        mine, _, _ = worker_shards(self.shards)
        source = source_from_spec(spec.source)
        max_pixels = pre.max_pixels or DEFAULT_MAX_PIXELS
        if spec.hashes:
            from ..metrics.dedup import bytes_hash, pixel_hash
        for shard in mine:
            base = RowBuffer()
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
                            arr = decode_image(s.image, max_pixels)
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


@dataclass
class Timings:
    read: float = 0.0  # time the main loop waited for data
    decode: float = 0.0  # time workers spent reading + decoding (summed over workers)
    compute: float = 0.0
    write: float = 0.0


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
    workers = min(spec.workers, len(shards)) if shards else 0
    acc: dict[int, dict[str, list]] = {}
    t_wait = time.perf_counter()
    for batch in loader(EvalStream(spec, shards), workers, None, spec.pin):
        check_stop()
        if "fatal" in batch:
            _reraise(batch["fatal"])
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
