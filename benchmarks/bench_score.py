"""Scoring throughput and memory on real CIFAR-10 shards.

    python benchmarks/bench_score.py ../shared/data/cifar10 [--samples 50000] [--repeats 5] [--compare-workers 1]
    python benchmarks/bench_score.py --normalise [--image-size 224] [--batch-size 128]

Prints, from the same run:
  * dataprune score (--metric loss --epochs 0, resnet18 from a checkpoint, 32 px, default --workers) in
    samples/s, and its ratio to the model-only forward throughput on pre-decoded tensors (the limit;
    target ≥ 0.85). The machines here are shared and their speed drifts by ±20 % within minutes, so
    every scoring run is flanked by two forward-only runs and divided by their mean: the figure is
    the median of these paired ratios (with their range);
  * the same for other --workers counts given with --compare-workers;
  * the whole command in a fresh process (`python -m dataprune score ...`: imports, start-up and exit
    included; target ≥ 0.9 × forward-only), flanked the same way, beside a bare `import torch, timm`;
  * a plain torchvision ImageFolder + DataLoader loop doing the same work (decode, normalise, forward,
    per-sample loss), with the faster of 0 and 1 loader workers;
  * peak RSS of the whole `dataprune score` process tree at 10k vs 50k samples (should stay flat).
--normalise: the cost per image of turning a uint8 channels-last batch into the model's normalised
float input on the CPU — engine.batches.Normalizer against the three-pass form it replaced
(``.float()``, subtract, divide) and beside the limit, a plain uint8 → float32 copy into a kept
buffer; alternating, medians of 21.
The checkpoint holds randomly initialised resnet18 weights saved as safetensors: throughput does not
depend on the weight values, and no weights can be downloaded here.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import median, run_with_peak_rss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", help="directory with train-*.tar (e.g. ../shared/data/cifar10)")
    ap.add_argument("--normalise", action="store_true", help="only time the batch normalisation (see above)")
    ap.add_argument("--image-size", type=int, default=224, help="--normalise: image size")
    ap.add_argument("--samples", type=int, default=50000, help="samples for the throughput figures (multiple of 5000)")
    ap.add_argument("--repeats", type=int, default=5, help="paired runs (scoring between two forward-only runs)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=None, help="dataprune --workers (default: its own auto choice)")
    ap.add_argument("--compare-workers", default="", help="also measure these --workers counts, e.g. 1,2")
    ap.add_argument("--no-rss", action="store_true", help="skip the 10k vs 50k memory runs")
    ap.add_argument("--no-torchvision", action="store_true", help="skip the torchvision ImageFolder comparison")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole-command (fresh process) runs")
    a = ap.parse_args()
    if a.normalise:
        return normalise(a)

    import numpy as np  # noqa: F401
    import timm
    import torch
    from safetensors.torch import save_file

    from dataprune.decode import decode_image
    from dataprune.engine import ScoreConfig, auto_workers, score
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
    default_workers = auto_workers(False) if a.workers is None else a.workers
    variants = [default_workers] + [int(w) for w in a.compare_workers.split(",") if w.strip() and int(w) != default_workers]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; {n_shards * per_shard} samples; "
          f"dataprune --workers {default_workers}" + (" (auto)" if a.workers is None else ""))

    # 1. model-only forward on pre-decoded tensors (the limit); the same pass writes the image folder
    #    the torchvision loop reads
    src = open_source(subset)
    folder = os.path.join(tmp, "folder")
    imgs, labels = [], []
    for sh in src.list_shards():
        for s in src.iter_samples(sh):
            imgs.append(torch.from_numpy(decode_image(s.image)).permute(2, 0, 1))
            labels.append(s.label)
            if not a.no_torchvision:
                d = os.path.join(folder, f"{s.label:02d}")
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, f"{s.key}.jpg"), "wb") as fh:
                    fh.write(s.image)
    x_all = torch.stack(imgs)
    y_all = torch.tensor(labels)
    del imgs
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

    # the limit runs in the faster memory layout (dataprune uses channels-last on every device)
    forward_only(model, x_all), forward_only(model_cl, x_cl)  # warm-up
    nchw, cl = forward_only(model, x_all), forward_only(model_cl, x_cl)
    limit_model, limit_x = (model_cl, x_cl) if cl >= nchw else (model, x_all)
    print(f"layouts: NCHW {nchw:.0f}/s, channels-last {cl:.0f}/s → the limit runs {'channels-last' if cl >= nchw else 'NCHW'}")

    # 2. dataprune score (in process: plan + model + stream + write, not the Python imports), each run
    #    flanked by forward-only runs
    fwd = [forward_only(limit_model, limit_x)]
    ours: dict[int, list[float]] = {w: [] for w in variants}
    ratios: dict[int, list[float]] = {w: [] for w in variants}
    for r in range(a.repeats):
        for w in variants:
            out = os.path.join(tmp, f"scores-{w}-{r}")
            res = score(ScoreConfig(data=subset, metrics=("loss",), out=out, checkpoint=ck, epochs=0, batch_size=a.batch_size,
                                    workers=w, device="cpu"))
            fwd.append(forward_only(limit_model, limit_x))
            speed = res["seen"] / res["seconds"]
            ours[w].append(speed)
            ratios[w].append(speed / ((fwd[-2] + fwd[-1]) / 2))
            t = res["timings"]
            print(f"  run {r + 1}/{a.repeats} --workers {w}: {speed:.0f}/s between forward-only {fwd[-2]:.0f}/s and {fwd[-1]:.0f}/s "
                  f"→ {ratios[w][-1]:.3f}  [{res['seconds']:.1f}s: waited for data {t['read']:.1f}s (main-process decode when "
                  f"--workers 0), worker decode {t['decode']:.1f}s, compute {t['compute']:.1f}s, write {t['write']:.1f}s]", flush=True)

    f = median(fwd)
    print(f"model-only forward (pre-decoded tensors): {f:8.0f} samples/s (median of {len(fwd)}, range {min(fwd):.0f}–{max(fwd):.0f})")
    for w in variants:
        o = median(ours[w])
        print(f"dataprune score --workers {w}{' (default)' if w == default_workers else ''}: {o:8.0f} samples/s → "
              f"{median(ratios[w]):.2f} × forward-only (median of {len(ratios[w])} paired ratios, range "
              f"{min(ratios[w]):.2f}–{max(ratios[w]):.2f}; target ≥ 0.85)")

    # 2b. the whole command in a fresh process (imports, start-up and exit included), flanked the same
    #     way, beside the bare import of torch + timm measured in the same run (the floor no change
    #     in dataprune can lower: timm imports torchvision, which imports torch._dynamo)
    if not a.no_whole:
        whole, wratios, floors = [], [], []
        for r in range(a.repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import torch, timm"], check=True)
            floors.append(time.perf_counter() - t0)
            cmd = [sys.executable, "-m", "dataprune", "score", subset, "--metric", "loss", "--epochs", "0", "--checkpoint", ck,
                   "--batch-size", str(a.batch_size), "--device", "cpu", "--out", os.path.join(tmp, f"whole-{r}"), "--json",
                   *(["--workers", str(a.workers)] if a.workers is not None else [])]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode:
                raise SystemExit(p.stderr[-2000:])
            fwd.append(forward_only(limit_model, limit_x))
            seen = json.loads(p.stdout)["seen"]
            whole.append(seen / wall)
            wratios.append(whole[-1] / ((fwd[-2] + fwd[-1]) / 2))
            print(f"  whole command {r + 1}/{a.repeats}: {seen} samples in {wall:.1f}s wall = {whole[-1]:.0f}/s → {wratios[-1]:.3f} × "
                  f"forward-only; bare `import torch, timm` {floors[-1]:.2f}s", flush=True)
        fl = median(floors)
        print(f"whole `dataprune score` command: {median(whole):8.0f} samples/s → {median(wratios):.2f} × forward-only (median of "
              f"{len(wratios)} paired ratios, range {min(wratios):.2f}–{max(wratios):.2f}; target ≥ 0.9); of its wall time, "
              f"{fl:.2f}s is the bare import of torch + timm (median), the limit of what any start-up work could give back: "
              f"{seen / (seen / median(whole) - fl) / median(fwd):.2f} × forward-only without it")

    # 3. torchvision ImageFolder + DataLoader doing the same work
    if not a.no_torchvision:
        import torchvision
        import torchvision.transforms as T

        tf = T.Compose([T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])

        def imagefolder(workers: int) -> float:
            ds = torchvision.datasets.ImageFolder(folder, transform=tf)
            dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, num_workers=workers)
            t = time.perf_counter()
            n = 0
            with torch.inference_mode():
                for xb, yb in dl:
                    torch.nn.functional.cross_entropy(model(xb), yb, reduction="none")
                    n += len(yb)
            return n / (time.perf_counter() - t)

        tv_runs = {w: [imagefolder(w) for _ in range(min(3, a.repeats))] for w in (0, 1)}
        tv_w = max(tv_runs, key=lambda w: median(tv_runs[w]))
        v, o = median(tv_runs[tv_w]), median(ours[default_workers])
        print(f"torchvision ImageFolder + DataLoader:      {v:8.0f} samples/s (num_workers {tv_w}, the faster of 0: "
              f"{median(tv_runs[0]):.0f}, 1: {median(tv_runs[1]):.0f}) → dataprune is {o / v:.2f} × this")

    # 4. peak RSS at 10k vs 50k samples (whole CLI process tree)
    if not a.no_rss and len(shards) >= 10:
        peaks = {}
        for k in (2, 10):
            cmd = [sys.executable, "-m", "dataprune.cli", "score", shard_list(k), "--metric", "loss", "--epochs", "0",
                   "--checkpoint", ck, "--batch-size", str(a.batch_size), "--device", "cpu",
                   *(["--workers", str(a.workers)] if a.workers is not None else []),
                   "--out", os.path.join(tmp, f"rss-{k}"), "--json"]
            res, peak, wall = run_with_peak_rss(cmd)
            if res.returncode != 0:
                raise SystemExit(res.stderr)
            peaks[k] = peak
            print(f"peak RSS, {k * per_shard:6d} samples: {peak / 2**20:7.0f} MiB (process tree; {json.loads(res.stdout)['seen']} scored, "
                  f"{wall:.0f}s wall)")
        print(f"peak RSS ratio 50k / 10k: {peaks[10] / peaks[2]:.2f} (flat = 1.0)")


def normalise(a) -> None:
    import torch

    from dataprune.engine.batches import Normalizer

    n, s = a.batch_size, a.image_size
    x = torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # as EvalStream stacks a batch
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m255, s255 = torch.tensor(mean).view(1, 3, 1, 1) * 255, torch.tensor(std).view(1, 3, 1, 1) * 255
    norm, buf = Normalizer(mean, std, torch.device("cpu"), True), torch.empty(x.shape, memory_format=torch.channels_last)

    def old():
        return ((x.float() - m255) / s255).contiguous(memory_format=torch.channels_last)

    fns = {"Normalizer": lambda: norm(x), "three passes (before)": old, "limit: uint8 → float copy": lambda: buf.copy_(x)}
    assert float((norm(x) - old()).abs().max()) < 1e-4
    ms: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(21):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            ms[k].append((time.perf_counter() - t) / n * 1e3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; batches of {n} at {s} px")
    for k, v in ms.items():
        print(f"  {k:28s} {median(v):.3f} ms an image (range {min(v):.3f}–{max(v):.3f})")


if __name__ == "__main__":
    main()
