"""A small built-in demo dataset: coloured shapes in 10 classes, written as WebDataset shards.

Each class has its own shape and hue; per-sample jitter (position, size, brightness, noise) makes
some samples harder than others, and ``label_noise`` flips a seeded fraction of labels (the flipped
keys are listed in ``flipped.txt``) so difficulty metrics have something real to find.
"""

from __future__ import annotations

import io
import os

import numpy as np

from . import tario
from .tables import atomic_write_bytes

# Names sort in label order, so an exported image folder reads back with the same label numbers.
CLASSES = ["0-red-disc", "1-orange-square", "2-yellow-ring", "3-green-cross", "4-cyan-bar", "5-blue-triangle",
           "6-purple-diamond", "7-pink-dots", "8-white-stripes", "9-grey-checker"]
_HUES = [(220, 40, 40), (240, 140, 30), (230, 220, 40), (40, 190, 60), (40, 200, 210), (40, 70, 220),
         (150, 50, 200), (240, 120, 190), (235, 235, 235), (128, 128, 128)]


def render(label: int, rng: np.random.Generator, size: int = 32, hardness: float = 0.0) -> np.ndarray:
    """One RGB image of class ``label``; ``hardness`` in [0, 1] adds clutter and washes out colour."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = rng.uniform(0.3, 0.7, 2)
    r = rng.uniform(0.18, 0.3)
    dx, dy = xx - cx, yy - cy
    shapes = [
        dx**2 + dy**2 < r**2,
        (abs(dx) < r) & (abs(dy) < r),
        abs(np.sqrt(dx**2 + dy**2) - r) < 0.07,
        (abs(dx) < 0.07) & (abs(dy) < r) | (abs(dy) < 0.07) & (abs(dx) < r),
        (abs(dy) < 0.09) & (abs(dx) < 0.4),
        (dy > -r) & (dy < r) & (abs(dx) < (dy + r) / 2),
        abs(dx) + abs(dy) < r,
        (np.sin(xx * 25) > 0.6) & (np.sin(yy * 25) > 0.6),
        np.sin(yy * 30) > 0,
        ((xx * 6).astype(int) + (yy * 6).astype(int)) % 2 == 0,
    ]
    mask = shapes[label].astype(np.float32)
    colour = np.array(_HUES[label], np.float32)
    grey = colour.mean()
    colour = colour * (1 - 0.8 * hardness) + grey * 0.8 * hardness
    bg = rng.uniform(0, 80, 3).astype(np.float32)
    img = bg[None, None, :] * (1 - mask[..., None]) + colour[None, None, :] * mask[..., None]
    img += rng.normal(0, 10 + 60 * hardness, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_demo(out: str, n: int = 1000, shard_size: int = 250, image_size: int = 32, seed: int = 0,
              label_noise: float = 0.0, prefix: str = "demo") -> dict:
    """Write ``n`` samples as ``{prefix}-NNNNNN.tar`` shards plus ``classes.txt``; returns a summary."""
    rng = np.random.default_rng(seed)
    os.makedirs(out, exist_ok=True)
    labels = rng.integers(0, len(CLASSES), n)
    hardness = rng.beta(1.2, 4.0, n)
    flip = rng.random(n) < label_noise
    shown = labels.copy()
    shown[flip] = (labels[flip] + rng.integers(1, len(CLASSES), flip.sum())) % len(CLASSES)
    flipped = []
    shards = 0
    for s0 in range(0, n, shard_size):
        chunks: list[bytes] = []
        for i in range(s0, min(n, s0 + shard_size)):
            key = f"{i:06d}"
            img = _jpeg(render(int(labels[i]), rng, image_size, float(hardness[i])))
            cls = str(int(shown[i])).encode()
            for ext, data in (("jpg", img), ("cls", cls)):
                chunks += [tario.member_header(f"{key}.{ext}", len(data)), data, tario.padding(len(data))]
            if flip[i]:
                flipped.append(key)
        body = b"".join(chunks)
        atomic_write_bytes(os.path.join(out, f"{prefix}-{shards:06d}.tar"), body + tario.end_of_archive(len(body)))
        shards += 1
    atomic_write_bytes(os.path.join(out, "classes.txt"), ("\n".join(CLASSES) + "\n").encode())
    if label_noise > 0:
        atomic_write_bytes(os.path.join(out, "flipped.txt"), ("\n".join(flipped) + "\n").encode())
    return {"out": out, "samples": n, "shards": shards, "classes": len(CLASSES), "flipped": len(flipped)}
