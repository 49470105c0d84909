"""Scoring throughput and memory on real CIFAR-10 shards.

    python benchmarks/bench_score.py ../shared/data/cifar10 [--samples 10000] [--repeats 3]

Prints, from the same run:
  * dataprune score (--metric loss --epochs 0, resnet18 from a checkpoint, 32 px) in samples/s,
  * the model-only forward throughput on pre-decoded tensors (the limit), and the ratio (target ≥ 0.85),
  * a plain torchvision ImageFolder + DataLoader loop doing the same work (decode, normalise, forward, per-sample loss),
  * peak RSS of the whole `dataprune score` process tree at 10k vs 50k samples (should stay flat).
The checkpoint holds randomly initialised resnet18 weights saved as safetensors: throughput does not
depend on the weight values, and no weights can be downloaded here.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import median, run_with_peak_rss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", help="directory with train-*.tar (e.g. ../shared/data/cifar10)")
    ap.add_argument("--samples", type=int, default=50000, help="samples for the throughput figures (multiple of 5000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-rss", action="store_true", help="skip the 10k vs 50k memory runs")
    a = ap.parse_args()

    import numpy as np
    import timm
    import torch
    from safetensors.torch import save_file

    from dataprune.decode import decode_image
    from dataprune.engine import ScoreConfig, score
    from dataprune.sources import open_source

    shards = sorted(glob.glob(os.path.join(a.data, "train-*.tar")))
    per_shard = 5000
    n_shards = max(1, a.samples // per_shard)
    tmp = tempfile.mkdtemp(prefix="bench-score-")
    ck = os.path.join(tmp, "resnet18.safetensors")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ck)

    def shard_list(k: int) -> str:
        path = os.path.join(tmp, f"shards-{k}.txt")
        with open(path, "w") as f:
            f.write("\n".join(os.path.abspath(s) for s in shards[:k]) + "\n")
        return path

    subset = shard_list(n_shards)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; {n_shards * per_shard} samples")

    # 1. model-only forward on pre-decoded tensors (the limit)
    src = open_source(subset)
    imgs, labels = [], []
    for sh in src.list_shards():
        for s in src.iter_samples(sh):
            imgs.append(torch.from_numpy(decode_image(s.image)).permute(2, 0, 1))
            labels.append(s.label)
    x_all = torch.stack(imgs)
    y_all = torch.tensor(labels)
    cfg = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1) * 255
    model.eval()
    import copy

    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x_all.contiguous(memory_format=torch.channels_last)

    def forward_only(m, x) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(x), a.batch_size):
                xb = (x[i : i + a.batch_size].float() - mean) / std
                torch.nn.functional.cross_entropy(m(xb), y_all[i : i + a.batch_size], reduction="none")
        return len(x) / (time.perf_counter() - t)

    # the limit: the faster of the two memory layouts (dataprune uses channels-last)
    forward_only(model, x_all), forward_only(model_cl, x_cl)  # warm-up
    fwd_nchw = [forward_only(model, x_all) for _ in range(a.repeats)]
    fwd_cl = [forward_only(model_cl, x_cl) for _ in range(a.repeats)]
    fwd = fwd_cl if median(fwd_cl) >= median(fwd_nchw) else fwd_nchw

    # 2. dataprune score, in process (engine time: plan + model + stream + write; not the Python imports)
    ours, ours_engine = [], []
    for r in range(a.repeats):
        out = os.path.join(tmp, f"scores-{r}")
        res = score(ScoreConfig(data=subset, metrics=("loss",), out=out, checkpoint=ck, epochs=0, batch_size=a.batch_size,
                                workers=a.workers, device="cpu"))
        ours.append(res["seen"] / res["seconds"])
        t = res["timings"]
        ours_engine.append(t)

    # 3. torchvision ImageFolder + DataLoader doing the same work
    import torchvision
    import torchvision.transforms as T

    folder = os.path.join(tmp, "folder")
    for sh in src.list_shards():
        for s in src.iter_samples(sh):
            d = os.path.join(folder, f"{s.label:02d}")
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{s.key}.jpg"), "wb") as f:
                f.write(s.image)
    tf = T.Compose([T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])

    def imagefolder() -> float:
        ds = torchvision.datasets.ImageFolder(folder, transform=tf)
        dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=a.workers)
        t = time.perf_counter()
        n = 0
        with torch.inference_mode():
            for xb, yb in dl:
                torch.nn.functional.cross_entropy(model(xb), yb, reduction="none")
                n += len(yb)
        return n / (time.perf_counter() - t)

    tv = [imagefolder() for _ in range(a.repeats)]

    f, o, v = median(fwd), median(ours), median(tv)
    print(f"model-only forward (pre-decoded tensors): {f:8.0f} samples/s (median of {a.repeats}; NCHW {median(fwd_nchw):.0f}, "
          f"channels-last {median(fwd_cl):.0f})")
    print(f"dataprune score --metric loss --epochs 0: {o:8.0f} samples/s  → {o / f:.2f} × forward-only (target ≥ 0.85)")
    print(f"torchvision ImageFolder + DataLoader:      {v:8.0f} samples/s  → dataprune is {o / v:.2f} × this")
    t = ours_engine[len(ours_engine) // 2]
    print(f"  engine split (one run): waited for data {t['read']:.1f}s, worker decode {t['decode']:.1f}s, "
          f"compute {t['compute']:.1f}s, write {t['write']:.1f}s")

    # 4. peak RSS at 10k vs 50k samples (whole CLI process tree)
    if not a.no_rss and len(shards) >= 10:
        peaks = {}
        for k in (2, 10):
            cmd = [sys.executable, "-m", "dataprune.cli", "score", shard_list(k), "--metric", "loss", "--epochs", "0",
                   "--checkpoint", ck, "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--device", "cpu",
                   "--out", os.path.join(tmp, f"rss-{k}"), "--json"]
            res, peak, wall = run_with_peak_rss(cmd)
            if res.returncode != 0:
                raise SystemExit(res.stderr)
            peaks[k] = peak
            print(f"peak RSS, {k * per_shard:6d} samples: {peak / 2**20:7.0f} MiB (process tree; {json.loads(res.stdout)['seen']} scored, "
                  f"{wall:.0f}s wall)")
        print(f"peak RSS ratio 50k / 10k: {peaks[10] / peaks[2]:.2f} (flat = 1.0)")


if __name__ == "__main__":
    main()
