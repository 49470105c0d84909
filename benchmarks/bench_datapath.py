"""The data path of `score` at 224 px against the best plain CPU path, the model, and the whole command.

    pip install -e .[bench]        # scikit-image: the real photographs the JPEGs are cut from
    python benchmarks/bench_datapath.py [--n 600] [--n-large 200] [--repeats 5] [--score-repeats 3]

Generates, in a temporary directory (never committed), JPEGs cut from scikit-image's colour photos:
  * "imagenet": random crops with an ImageNet-like aspect ratio, resized to a shorter side of 300–500 px,
    with mild sensor noise (so the mean file size lands near ImageNet's ~110 KB), quality 75–95,
    ~15 % progressive, ~5 % CMYK, ~30 % carrying EXIF, two thirds of those with orientation ≠ 1;
  * "large": the same at 1024×768 / 768×1024.
Prints, from one run, per-core images/s (one process, one torch thread; images per CPU-second of the
thread, so time the shared machine gives to other processes does not count) of
  (a) dataprune's data path: decode.decode_image with the score workers' min_side, then the score's
      own eval Preprocess (taken from engine.plan, so it is exactly what the workers run), to the
      224 uint8 crop; and the same with --exact-decode;
  (b) the reference path written plainly here: simplejpeg decode at a 1/2, 1/4 or 1/8 DCT scale when
      that still covers 1.5 × the resize (dataprune's reducing gap), the centre-crop box cut first, then one uint8 resize (torch's
      antialiased resize, channels-last, with the model's own filter — bicubic for timm's resnet18, 13 % dearer than
      bilinear; the bilinear variant is printed too) — PIL with draft for CMYK;
  (c) resnet18 forward at 224 on pre-decoded, pre-normalised tensors (1 thread and all threads);
  (d) `dataprune score DIR --metric loss --epochs 0 --image-size 224 --model resnet18 --checkpoint
      <random-init safetensors>` on the ImageNet-like set (webdataset shards), its score phase and wall;
and the ratios to their limits: (a)/(b) (targets ≥ 0.95 ImageNet-size, ≥ 0.9 1024 px), (d) ÷ R·F/(R+F)
(R = reference rate, F = forward rate on all cores; target ≥ 0.9). Also the accuracy cost of the
reduced-scale decode: mean absolute difference of the final 224 crops against a full decode, 0–255.
Medians over repeats; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _util import median  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina", "hubble_deep_field", "stereo_motorcycle")
NOISE, SHARPEN = 8.0, 400  # σ of grey sensor noise, unsharp-mask percent (as cameras do): the upscaled crops of these
# ≤ 640-px photos would otherwise be smoother, and their files smaller, than ImageNet's (~110 KB)
ASPECTS = (4 / 3, 4 / 3, 4 / 3, 4 / 3, 3 / 2, 3 / 2, 1.0, 3 / 4, 3 / 4, 2 / 3)  # width / height, ImageNet-like mix


def photos() -> list:
    import skimage.data as D

    out = []
    for name in PHOTOS:
        a = getattr(D, name)()
        out.append(np.ascontiguousarray((a[0] if isinstance(a, tuple) else a)[..., :3]))
    return out


def synthetic_photos() -> list:
    """Stand-ins where scikit-image is not installed (pip install 'dataprune[bench]'): Mandelbrot crops."""
    from PIL import Image

    out = []
    for (w, h), extent in zip(((900, 700), (700, 900), (1000, 640)), ((-2.1, -1.2, 0.9, 1.3), (-0.8, -0.3, -0.4, 0.1), (-1.5, -0.5, -0.5, 0.5))):
        base = np.asarray(Image.effect_mandelbrot((w, h), extent, 80).convert("L"), np.int16)
        out.append(np.stack([base, np.roll(base, 57, axis=1), 255 - base], axis=2).clip(0, 255).astype(np.uint8))
    return out


def sources() -> tuple[list, str]:
    """The source photos and what they are: scikit-image's photographs, else synthetic ones."""
    try:
        return photos(), "scikit-image photos"
    except ImportError:
        return synthetic_photos(), "synthetic photos (scikit-image not installed: pip install 'dataprune[bench]')"


def make_jpeg(rng, src: np.ndarray, size: tuple[int, int]) -> tuple[bytes, dict]:
    """A random crop of ``src`` with the aspect of ``size`` (w, h), resized to it, noised, encoded."""
    from PIL import Image, ImageFilter

    w, h = size
    sh, sw = src.shape[:2]
    scale = rng.uniform(0.6, 1.0) * min(sw / w, sh / h)
    cw, ch = int(w * scale), int(h * scale)
    x, y = rng.integers(0, sw - cw + 1), rng.integers(0, sh - ch + 1)
    im = Image.fromarray(src[y : y + ch, x : x + cw]).resize((w, h), Image.BICUBIC).filter(ImageFilter.UnsharpMask(2, SHARPEN, 1))
    arr = np.asarray(im).astype(np.int16) + rng.normal(0, NOISE, (h, w, 1)).astype(np.int16)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    kind = {"quality": int(rng.integers(75, 96)), "progressive": bool(rng.random() < 0.15)}
    if rng.random() < 0.05:
        im, kind["cmyk"] = im.convert("CMYK"), True
    if rng.random() < 0.3:
        exif = Image.Exif()
        exif[0x0112] = 1 if rng.random() < 1 / 3 else int(rng.integers(2, 9))
        exif[0x010F] = "bench camera"
        kind["orientation"] = exif[0x0112]
        im.info["exif"] = exif.tobytes()
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=kind["quality"], progressive=kind["progressive"], exif=im.info.get("exif", b""))
    return buf.getvalue(), kind


def make_set(rng, srcs, n: int, large: bool) -> list[bytes]:
    out = []
    for i in range(n):
        if large:
            size = (1024, 768) if rng.random() < 0.75 else (768, 1024)
        else:
            a = ASPECTS[rng.integers(len(ASPECTS))]
            short = int(rng.integers(300, 501))
            size = (int(round(short * a)), short) if a >= 1 else (short, int(round(short / a)))
        out.append(make_jpeg(rng, srcs[i % len(srcs)], size)[0])
    return out


def write_shards(root: str, images: list[bytes], shards: int = 4) -> None:
    os.makedirs(root, exist_ok=True)
    for k in range(shards):
        with tarfile.open(os.path.join(root, f"train-{k:03d}.tar"), "w") as tf:
            for i in range(k, len(images), shards):
                for name, data in ((f"{i:06d}.jpg", images[i]), (f"{i:06d}.cls", str(i % 10).encode())):
                    ti = tarfile.TarInfo(name)
                    ti.size, ti.mtime = len(data), 0
                    tf.addfile(ti, io.BytesIO(data))


# ----------------------------------------------------------------------------------- reference (b)

def reference_decode(data: bytes, side: int) -> np.ndarray:
    """simplejpeg at a reduced DCT scale (PIL + draft for CMYK), EXIF orientation as numpy views."""
    import simplejpeg

    from dataprune.decode.exif import jpeg_orientation

    h, w, cs, _ = simplejpeg.decode_jpeg_header(data)
    k = next((k for k in (8, 4, 2) if min(h, w) // k >= 1.5 * side), 1)  # the same reducing gap as dataprune
    if cs in ("RGB", "YCbCr", "Gray"):
        arr = simplejpeg.decode_jpeg(data, min_height=-(-h // k), min_width=-(-w // k)) if k > 1 else simplejpeg.decode_jpeg(data)
        o = jpeg_orientation(data) or 1
    else:
        from PIL import Image

        im = Image.open(io.BytesIO(data))
        if k > 1:
            im.draft(None, (w // k, h // k))
        arr, o = np.asarray(im.convert("RGB")), im.getexif().get(0x0112, 1)
    if o in (5, 6, 7, 8):
        arr = arr.transpose(1, 0, 2)
    return {2: arr[:, ::-1], 3: arr[::-1, ::-1], 4: arr[::-1], 6: arr[:, ::-1], 7: arr[::-1, ::-1], 8: arr[::-1]}.get(o, arr)


def reference(data: bytes, size: int, side: int, mode: str = "bilinear"):
    """The reference decode, the centre-crop box cut first, one uint8 resize."""
    import torch
    import torch.nn.functional as F

    arr = reference_decode(data, side)
    hh, ww = arr.shape[:2]
    s = side / min(hh, ww)  # resize scale of the shorter side; the crop box in decoded pixels
    ch, cw = min(hh, size / s), min(ww, size / s)
    y0, x0 = int(round((hh - ch) / 2)), int(round((ww - cw) / 2))
    crop = np.array(arr[y0 : y0 + int(round(ch)), x0 : x0 + int(round(cw))])  # a writable copy of the box only
    x = torch.from_numpy(crop).permute(2, 0, 1)[None]
    return F.interpolate(x, (size, size), mode=mode, antialias=True, align_corners=False)[0]


# ---------------------------------------------------------------------------------------- timing

def paired_rates(fns: dict, items: list, chunk: int = 20) -> dict:
    """images per CPU-second of each function over ``items`` (the calling thread's CPU time: every
    path here runs on one thread, so this is the per-core rate, and time the shared machine gives
    to other processes is not counted), timed chunk by chunk in alternating order, so the drift
    that remains (caches, clocks) falls on all of them alike."""
    spent = dict.fromkeys(fns, 0.0)
    names = list(fns)
    for c, i in enumerate(range(0, len(items), chunk)):
        part = items[i : i + chunk]
        for name in names if c % 2 == 0 else names[::-1]:
            fn = fns[name]
            t0 = time.thread_time()
            for d in part:
                fn(d)
            spent[name] += time.thread_time() - t0
    return {k: len(items) / v for k, v in spent.items()}


def forward_rate(threads: int, batch: int = 64, reps: int = 3) -> float:
    import timm
    import torch

    torch.set_num_threads(threads)
    m = timm.create_model("resnet18", num_classes=10).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        m(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            m(x)
    return batch * reps / (time.perf_counter() - t0)


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=600, help="ImageNet-like JPEGs")
    ap.add_argument("--n-large", type=int, default=200, help="1024-px JPEGs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--score-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import timm
    import torch
    from safetensors.torch import save_file

    from dataprune.decode import DecodeStats, decode_image
    from dataprune.engine import ScoreConfig
    from dataprune.engine.planning import plan

    print(f"load average before: {load()} ({os.cpu_count()} cores)")
    rng = np.random.default_rng(a.seed)
    srcs = photos()
    sets = {"imagenet": make_set(rng, srcs, a.n, False), "large": make_set(rng, srcs, a.n_large, True)}
    tmp = tempfile.mkdtemp(prefix="bench-datapath-")
    write_shards(os.path.join(tmp, "imagenet"), sets["imagenet"])
    for name, imgs in sets.items():
        print(f"{name}: {len(imgs)} JPEGs, mean {np.mean([len(d) for d in imgs]) / 1e3:.0f} KB")
    ck = os.path.join(tmp, "resnet18.safetensors")
    torch.manual_seed(0)
    save_file(timm.create_model("resnet18", num_classes=10).state_dict(), ck)
    cfg = ScoreConfig(data=os.path.join(tmp, "imagenet"), metrics=("loss",), epochs=0, image_size=224, model="resnet18",
                      checkpoint=ck, out=os.path.join(tmp, "scores"), device="cpu")
    pre = plan(cfg).stream(cuda=False).pre  # the score workers' own eval transform
    side, size = pre.decode_min_side, pre.size
    torch.set_num_threads(1)

    def ours(exact: bool, stats=None):
        return lambda d: pre(decode_image(d, None, None if exact else side, stats, view=True))  # as the score workers call it

    # accuracy of the reduced-scale decode, and which paths the images took
    for name, imgs in sets.items():
        st = DecodeStats()
        diffs = [np.abs(np.asarray(ours(False, st)(d), np.float32) - np.asarray(ours(True)(d), np.float32)).mean() for d in imgs]
        red = [x for x, d in zip(diffs, imgs) if x > 0]
        print(f"{name}: decode paths {st.as_dict()}; reduced-vs-full MAD of the 224 crops (0-255): mean over all {np.mean(diffs):.3f}, "
              f"over the {len(red)} reduced {np.mean(red) if red else 0:.3f}, max {max(diffs):.3f}")

    res: dict[str, list] = {}
    for _ in range(a.repeats):  # interleaved, so the machine's drift hits all alike
        for name, imgs in sets.items():
            fns = {"ours": ours(False), "exact": ours(True), "ref": lambda d: reference(d, size, side, pre.interpolation),
                   "ref_bilinear": lambda d: reference(d, size, side),
                   "dec": lambda d: decode_image(d, None, side), "refdec": lambda d: np.ascontiguousarray(reference_decode(d, side))}
            for label, r in paired_rates(fns, imgs).items():
                res.setdefault((name, label), []).append(r)
    fwd1 = median([forward_rate(1) for _ in range(3)])
    threads = os.cpu_count()
    fwd = median([forward_rate(threads) for _ in range(3)])
    torch.set_num_threads(1)
    print("\nper-core images/s (median of %d; ratio = median of per-repeat ratios)" % a.repeats)
    for name, target in (("imagenet", 0.95), ("large", 0.9)):
        o, e, r = (np.array(res[(name, k)]) for k in ("ours", "exact", "ref"))
        print(f"  {name:9s} (a) dataprune {median(o):6.0f}  exact-decode {median(e):6.0f}   (b) reference {median(r):6.0f}   "
              f"(a)/(b) = {median(o / r):.3f} [{(o / r).min():.2f}-{(o / r).max():.2f}] (target ≥ {target}; {pre.interpolation} as the model)")
        rb = np.array(res[(name, "ref_bilinear")])
        print(f"  {'':9s}     against a bilinear reference {median(rb):6.0f}: {median(o / rb):.3f} (a cheaper filter than the model's)")
        dd, rd = np.array(res[(name, "dec")]), np.array(res[(name, "refdec")])
        print(f"  {'':9s}     decode alone (to a contiguous array): decode_image {median(dd):6.0f}   reference decode {median(rd):6.0f}   "
              f"ratio {median(dd / rd):.3f}")
    R = median(res[("imagenet", "ref")])
    print(f"  (c) resnet18 forward at 224: {fwd1:.0f} images/s on 1 thread, {fwd:.0f} on {threads} threads")
    rates, walls, ratios, wratios = [], [], [], []
    for _ in range(a.score_repeats):  # each run flanked by two forward-only measurements (the machine drifts)
        f0 = forward_rate(threads)
        torch.set_num_threads(1)
        cmd = [sys.executable, "-m", "dataprune", "score", cfg.data, "--metric", "loss", "--epochs", "0", "--image-size", "224",
               "--model", "resnet18", "--checkpoint", ck, "--out", cfg.out, "--overwrite", "--json"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode:
            sys.exit(f"score failed ({p.returncode}): {p.stderr[-2000:]}")
        f1 = forward_rate(threads)
        torch.set_num_threads(1)
        r = json.loads(p.stdout)
        secs = (r.get("phase_seconds") or {}).get("score", r["seconds"])
        ceil_ = R * (f0 + f1) / 2 / (R + (f0 + f1) / 2)
        rates.append(r["seen"] / secs)
        walls.append(r["seen"] / wall)
        ratios.append(rates[-1] / ceil_)
        wratios.append(walls[-1] / ceil_)
    ceiling = R * fwd / (R + fwd)
    print(f"  (d) dataprune score: {median(rates):.0f} images/s in its score phase, {median(walls):.0f} over the whole command's wall "
          f"time; ceiling R·F/(R+F) = {ceiling:.0f} (R = {R:.0f}, F = {fwd:.0f})")
    print(f"      score phase ÷ ceiling = {median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f}] (target ≥ 0.9; each run against the "
          f"mean F of its two flanking forward runs); wall ÷ ceiling = {median(wratios):.3f}")
    print(f"      decode paths of the last run: {r['timings'].get('decode_paths')}")
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
