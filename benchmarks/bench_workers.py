"""Decode in the main process or in DataLoader workers? Throughput per --workers count.

    python benchmarks/bench_workers.py --imagenet [--n 800] [--repeats 3] [--workers 0,1,2]
    python benchmarks/bench_workers.py ../shared/data/cifar10 [--model test_resnet] [--shards 2] [--repeats 5] [--workers 0,1]

--imagenet: scoring at 224 px (`dataprune score --metric loss --epochs 0`, resnet18 from a random-init
checkpoint, CPU) on ImageNet-like JPEGs generated here (benchmarks/bench_datapath.py's photographs
when scikit-image is installed; else PIL-drawn ones), in 4 shards, each worker count in turn, after
a warm-up. Beside each: the limits measured in the same run — R, dataprune's decode + eval
transform per core (one thread), F, the model-only forward with normalisation on all cores, and
the shared-core ceiling c·R·F/(c·R + F) (c cores, decode and forward sharing them perfectly) —
and each count's score-phase images/s as a fraction of it.

CIFAR (a directory of train-*.tar): trains the proxy for one epoch (`dataprune score --metric el2n --epochs 1`, CPU) on the first
``--shards`` CIFAR-10 train shards with each worker count in turn, alternating so that the machine's
drift hits every count alike, after one warm-up run. Prints the median seconds per count, their
range, and each count's time relative to the default (`engine.planning.auto_workers`). The scoring-only side
of the same question is in bench_score.py (--compare-workers).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import median  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", help="directory with train-*.tar (e.g. ../shared/data/cifar10)")
    ap.add_argument("--imagenet", action="store_true", help="score ImageNet-like JPEGs at 224 px instead")
    ap.add_argument("--n", type=int, default=800, help="--imagenet: images generated")
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", default="0,1", help="worker counts to compare")
    ap.add_argument("--batch-size", type=int, default=128)
    a = ap.parse_args()
    if a.imagenet:
        return imagenet(a)

    import torch

    from dataprune.engine import ScoreConfig, auto_workers, score

    shards = sorted(glob.glob(os.path.join(a.data, "train-*.tar")))[: a.shards]
    tmp = tempfile.mkdtemp(prefix="bench-workers-")
    subset = os.path.join(tmp, "shards.txt")
    with open(subset, "w") as f:
        f.write("\n".join(os.path.abspath(s) for s in shards) + "\n")
    counts = [int(w) for w in a.workers.split(",") if w.strip()]
    default = auto_workers(False, 32 * 32)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; {len(shards)} shards; "
          f"model {a.model}; default --workers here: {default}")

    def run(w: int, tag: str) -> float:
        t = time.perf_counter()
        score(ScoreConfig(data=subset, metrics=("el2n",), out=os.path.join(tmp, tag), model=a.model, epochs=1,
                          batch_size=a.batch_size, workers=w, device="cpu"))
        return time.perf_counter() - t

    run(counts[0], "warm-up")
    secs: dict[int, list[float]] = {w: [] for w in counts}
    for r in range(a.repeats):
        for w in counts:
            secs[w].append(run(w, f"w{w}-{r}"))
            print(f"  run {r + 1}/{a.repeats} --workers {w}: {secs[w][-1]:.1f}s", flush=True)
    ref = median(secs[default]) if default in secs else None
    for w in counts:
        m = median(secs[w])
        rel = f" → {m / ref:.2f} × the default's time" if ref else ""
        print(f"--workers {w}{' (default)' if w == default else ''}: {m:.1f}s median (range {min(secs[w]):.1f}–{max(secs[w]):.1f}){rel}")


def _images(n: int) -> list[bytes]:
    import numpy as np

    from _util import sibling

    B = sibling("bench_datapath")
    srcs, kind = B.sources()
    print(f"images: {n} ImageNet-like JPEGs from {kind}")
    return B.make_set(np.random.default_rng(0), srcs, n, large=False)


def imagenet(a) -> None:
    import io
    import tarfile

    import numpy as np
    import timm
    import torch
    from safetensors.torch import save_file

    from dataprune.decode import decode_image
    from dataprune.engine import ScoreConfig, auto_workers, score
    from dataprune.engine.batches import Normalizer
    from dataprune.engine.planning import plan

    tmp = tempfile.mkdtemp(prefix="bench-workers-224-")
    images = _images(a.n)
    data = os.path.join(tmp, "data")
    os.makedirs(data)
    for k in range(4):
        with tarfile.open(os.path.join(data, f"train-{k:03d}.tar"), "w") as tf:
            for i in range(k, len(images), 4):
                for name, b in ((f"{i:06d}.jpg", images[i]), (f"{i:06d}.cls", str(i % 10).encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size = len(b)
                    tf.addfile(ti, io.BytesIO(b))
    name = a.model if a.model != "test_resnet" else "resnet18"
    ck = os.path.join(tmp, f"{name}.safetensors")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ck)
    cores, threads = os.cpu_count(), torch.get_num_threads()

    def cfg(w: int, tag: str) -> ScoreConfig:
        return ScoreConfig(data=data, metrics=("loss",), out=os.path.join(tmp, tag), model=name, checkpoint=ck, epochs=0, workers=w,
                           device="cpu", batch_size=a.batch_size)

    pre = plan(cfg(0, "plan")).stream(cuda=False).pre
    sample = images[:200]

    def decode_rate() -> float:  # R: one core, one thread — what one worker (or the main process) does per image
        torch.set_num_threads(1)
        t = time.perf_counter()
        for b in sample:
            pre(decode_image(b, None, pre.decode_min_side))
        torch.set_num_threads(threads)
        return len(sample) / (time.perf_counter() - t)

    cl = model.to(memory_format=torch.channels_last)
    x8 = torch.from_numpy(np.stack([pre(decode_image(b, None, pre.decode_min_side)) for b in sample[: a.batch_size]])).permute(0, 3, 1, 2)
    dc = timm.data.resolve_model_data_config(model)
    norm = Normalizer(dc["mean"], dc["std"], torch.device("cpu"), True)

    def forward_rate() -> float:  # F: all threads, normalisation included, pre-decoded uint8 batches
        t, n = time.perf_counter(), 0
        with torch.inference_mode():
            while n < 3 * len(x8):
                torch.nn.functional.cross_entropy(cl(norm(x8)), torch.zeros(len(x8), dtype=torch.long), reduction="none")
                n += len(x8)
        return n / (time.perf_counter() - t)

    counts = [int(w) for w in a.workers.split(",") if w.strip()]
    default = auto_workers(False, int(np.prod(decode_image(images[0]).shape[:2])))  # as plan() sees the first image
    print(f"torch {torch.__version__}, {threads} threads, {cores} CPUs, load {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{len(images)} ImageNet-like JPEGs (mean {sum(map(len, images)) / len(images) / 1e3:.0f} KB), 4 shards; {name} at "
          f"{pre.size} (resize {pre.resize_side}, {pre.interpolation}); default --workers here: {default}")
    forward_rate(), score(cfg(counts[0], "warm-up"))  # warm-up
    R, F, speed = [], [], {w: [] for w in counts}
    for r in range(a.repeats):
        R.append(decode_rate())
        F.append(forward_rate())
        for w in counts:
            res = score(cfg(w, f"w{w}-{r}"))
            speed[w].append(res["seen"] / res["phase_seconds"]["score"])
            t = res["timings"]
            print(f"  run {r + 1}/{a.repeats} --workers {w}: {speed[w][-1]:.0f}/s (R {R[-1]:.0f}/s per core, F {F[-1]:.0f}/s; "
                  f"waited for data {t['read']:.1f}s, decode {t['decode']:.1f}s, compute {t['compute']:.1f}s, write {t['write']:.1f}s)",
                  flush=True)
    r_, f_ = median(R), median(F)
    ceiling = cores * r_ * f_ / (cores * r_ + f_)
    print(f"R, decode + eval transform, one core: {r_:6.0f} images/s (median of {len(R)}, range {min(R):.0f}–{max(R):.0f})")
    print(f"F, model-only forward, {threads} threads:  {f_:6.0f} images/s (median, range {min(F):.0f}–{max(F):.0f})")
    print(f"shared-core ceiling c·R·F/(c·R+F):      {ceiling:6.0f} images/s (serial R·F/(R+F): {r_ * f_ / (r_ + f_):.0f})")
    for w in counts:
        m = median(speed[w])
        print(f"--workers {w}{' (default)' if w == default else ''}: {m:6.0f} images/s → {m / ceiling:.2f} × the ceiling "
              f"(median of {len(speed[w])}, range {min(speed[w]):.0f}–{max(speed[w]):.0f})")
    print(f"load after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
