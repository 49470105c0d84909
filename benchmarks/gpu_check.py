"""GPU JPEG decode checks for a machine with CUDA (run by benchmarks/gpu_check.sh).

    python benchmarks/gpu_check.py OUTDIR [--n 2000]

Writes OUTDIR/imagenet (webdataset shards of ImageNet-like JPEGs: bench_datapath's generator, cut
from scikit-image's photos when it is installed, else from synthetic Mandelbrot photos) and prints:
  * parity: mean absolute difference (0–255) of the final 224 crops, GPU path (nvJPEG + GPU resize,
    decode.cuda.assemble) against the CPU path (decode_image + the eval Preprocess), over the JPEGs
    the GPU takes. Tolerance: mean ≤ 2.0 and 99th percentile ≤ 4.0 — nvJPEG's IDCT and chroma
    upsampling are not libjpeg-turbo's, and the GPU resizes the full image where the CPU may decode
    at a reduced scale first; a wrong orientation or colour conversion gives tens of units;
  * batched GPU decode alone (decode.cuda.decode_jpegs, 128 a call) and decode + resize + crop, images/s.
Also writes OUTDIR/resnet50.safetensors (random init) for gpu_check.sh's score runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _util import sibling  # noqa: E402

B = sibling("bench_datapath")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args()

    import torch

    from dataprune.decode import DEFAULT_MAX_PIXELS, decode_image, gpu_jpeg
    from dataprune.decode.cuda import assemble, decode_jpegs, gpu_decode_works
    from dataprune.engine.batches import GpuJpeg

    assert torch.cuda.is_available(), "no CUDA device"
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; nvJPEG decode works: "
          f"{gpu_decode_works(f'cuda:{torch.cuda.current_device()}')}")
    srcs, kind = B.sources()
    rng = np.random.default_rng(0)
    imgs = B.make_set(rng, srcs, a.n, False)
    B.write_shards(os.path.join(a.out, "imagenet"), imgs, shards=8)
    print(f"{len(imgs)} ImageNet-like JPEGs from {kind}, mean {np.mean([len(d) for d in imgs]) / 1e3:.0f} KB")

    import timm
    from safetensors.torch import save_file

    from dataprune.engine import ScoreConfig
    from dataprune.engine.planning import plan

    ck = os.path.join(a.out, "resnet50.safetensors")  # random init: speed does not depend on the weights
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet50", num_classes=10).state_dict().items()}, ck)
    cfg = ScoreConfig(data=os.path.join(a.out, "imagenet"), metrics=("loss",), epochs=0, image_size=224, model="resnet50",
                      checkpoint=ck, out=os.path.join(a.out, "scores"))
    pre = plan(cfg).stream(cuda=True).pre  # resnet50's own eval transform, as `score` builds it
    side = pre.decode_min_side
    print(f"eval transform: {pre}")
    todo = [(d, o) for d in imgs if (o := gpu_jpeg(d, DEFAULT_MAX_PIXELS)) is not None]
    print(f"the GPU takes {len(todo)} of {len(imgs)} (the rest: CMYK, decoded on the CPU)")
    mads = []
    for i in range(0, len(todo), 128):
        chunk = todo[i : i + 128]
        items = [(k, GpuJpeg(d, o, str(k))) for k, (d, o) in enumerate(chunk)]
        gpu, failed = assemble(items, None, len(items), pre.size, pre.eval_tensor, None, _Stats())
        assert not failed
        for (d, _), g in zip(chunk, gpu.cpu()):
            c = np.asarray(pre(decode_image(d, None, side)), np.float32)
            mads.append(np.abs(g.permute(1, 2, 0).numpy().astype(np.float32) - c).mean())
    mads = np.array(mads)
    ok = mads.mean() <= 2.0 and np.percentile(mads, 99) <= 4.0
    print(f"parity GPU vs CPU path, final 224 crops: MAD mean {mads.mean():.3f}, p99 {np.percentile(mads, 99):.3f}, "
          f"max {mads.max():.3f} (tolerance mean ≤ 2.0, p99 ≤ 4.0): {'OK' if ok else 'FAILED'}")

    datas, ors = [d for d, _ in todo], [o for _, o in todo]
    dev = torch.device("cuda", torch.cuda.current_device())
    for label, fn in (("decode", lambda ds, os_: decode_jpegs(ds, os_, dev)),
                      ("decode+resize+crop", lambda ds, os_: assemble([(k, GpuJpeg(d, o, "")) for k, (d, o) in enumerate(zip(ds, os_))],
                                                                      None, len(ds), pre.size, pre.eval_tensor, None, _Stats()))):
        fn(datas[:128], ors[:128])
        rates = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(0, len(datas), 128):
                fn(datas[i : i + 128], ors[i : i + 128])
            torch.cuda.synchronize()
            rates.append(len(datas) / (time.perf_counter() - t0))
        print(f"batched GPU {label} (128 a call, main process): {np.median(rates):.0f} images/s")
    sys.exit(0 if ok else 1)


class _Stats:
    gpu = 0

    def fell(self, reason):
        raise AssertionError(f"the GPU refused an image it should take ({reason})")


if __name__ == "__main__":
    main()
