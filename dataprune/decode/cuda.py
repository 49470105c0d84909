"""JPEG decode on the GPU: torchvision's batched nvJPEG (``torchvision.io.decode_jpeg(list, device=)``).

The DataLoader workers hand the raw bytes of the JPEGs ``gpu_jpeg`` accepts (with their EXIF
orientation) to the main process, which decodes them here in one call per batch. One image nvJPEG
refuses fails the whole call, so the batch is then decoded one image at a time and the refused ones
come back as None (the caller decodes those on the CPU and counts them)."""

from __future__ import annotations

import functools
import io

from ..errors import ConfigError, DecodeError
from .exif import orient_tensor


@functools.lru_cache(maxsize=None)
def gpu_decode_works(device: str) -> bool:
    """torchvision decodes a tiny JPEG on ``device`` (nvJPEG present, the build supports it)."""
    try:
        import torch
        from PIL import Image
        from torchvision.io import decode_jpeg

        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
        out = decode_jpeg([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device=device)
        return tuple(out[0].shape) == (3, 16, 16)
    except Exception:  # no CUDA, no nvJPEG in this build, a driver error: the CPU decodes
        return False


def use_gpu_decode(mode: str, cuda_device: bool, hashes: bool = False) -> bool:
    """Whether a pass decodes its JPEGs on the GPU. ``auto``: when the model runs on CUDA and
    torchvision can decode there; ``cuda`` without a CUDA device or decoder is a ConfigError.
    Passes that hash decoded pixels (the embedding cache) decode on the CPU: its hashes must not
    depend on the decoder."""
    if mode == "cpu" or hashes:
        return False
    if not cuda_device:
        if mode == "cuda":
            raise ConfigError("--decode cuda needs the model on a CUDA device (--device cuda); use --decode auto or cpu")
        return False
    import torch

    works = gpu_decode_works(f"cuda:{torch.cuda.current_device()}")
    if mode == "cuda" and not works:
        raise ConfigError("--decode cuda: torchvision cannot decode JPEGs on this GPU (no nvJPEG); use --decode auto or cpu")
    return works


def decode_jpegs(datas: list[bytes], orientations: list[int], device) -> list:
    """(3, H, W) uint8 tensors on ``device`` as displayed (EXIF orientation applied), None for each
    image the GPU refused."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    ts = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        out = list(decode_jpeg(ts, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad image fails the batch: decode one at a time
        out = []
        for t in ts:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
    return [None if x is None else orient_tensor(x, o) for x, o in zip(out, orientations)]


def assemble(jpegs: list, cpu_images, n: int, size: int, transform, cpu_decode, stats, device=None) -> tuple:
    """A batch of ``n`` (3, size, size) uint8 images on the current CUDA device (or ``device``: the
    tests run it on the CPU, where torchvision decodes the same way), in row order.

    ``jpegs``: (position, item) of the undecoded JPEGs (item: ``.data``, ``.orientation``), decoded
    here in one nvJPEG call, each resized and cropped on the GPU by ``transform`` ((3, H, W) uint8 →
    (3, size, size): the eval Preprocess's ``eval_tensor``, the CPU path's own steps); ``cpu_images``: the other positions' images,
    decoded by the workers. A JPEG the GPU refuses goes to ``cpu_decode(bytes)`` → (3, size, size)
    tensor, counted as fallback ``gpu``. Returns (images, [(index in jpegs, DecodeError)]) — the
    failed positions hold garbage."""
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=dev).contiguous(memory_format=torch.channels_last)
    taken = {p for p, _ in jpegs}
    others = [i for i in range(n) if i not in taken]
    if others:
        out[others] = cpu_images.to(dev, non_blocking=True)
    failed = []
    decoded = decode_jpegs([j.data for _, j in jpegs], [j.orientation for _, j in jpegs], dev)
    for k, ((p, j), x) in enumerate(zip(jpegs, decoded)):
        if x is not None:
            stats.gpu += 1
            out[p] = transform(x)
            continue
        stats.fell("gpu")
        try:
            out[p] = cpu_decode(j.data).to(dev)
        except DecodeError as e:
            failed.append((k, e))
    return out, failed
