"""Image bytes → uint8 RGB pixels (H, W, 3 numpy array; ``to_tensor`` gives C, H, W torch).

* EXIF orientation is applied (as ``PIL.ImageOps.exif_transpose`` does).
* Grayscale, palette (with transparency), RGBA/LA (alpha dropped, as torchvision's loader does),
  CMYK, YCbCr and 16-bit images become 8-bit RGB; 16-bit values are scaled (÷257), never clipped.
* A pixel-count limit guards against decompression bombs; it is checked from the header, before
  any pixel is decoded.
* JPEGs go through simplejpeg (libjpeg-turbo) when it is installed, their EXIF orientation read by
  ``exif.jpeg_meta`` and applied with numpy; everything else, and any JPEG that path is not sure of
  (CMYK/YCCK, metadata it leaves to PIL, bytes libjpeg-turbo refuses), goes through PIL — per image,
  counted in ``DecodeStats.fallback`` by reason.
* ``min_side``: the caller needs no more than this shorter side (the eval transform's resize
  target). A JPEG whose shorter side is at least 3× that (2 × ``REDUCING_GAP``) is decoded at a
  reduced DCT scale (1/2, 1/4 or 1/8: libjpeg-turbo's scaled IDCT, PIL's ``draft`` on its path),
  never below 1.5 × ``min_side``.
  The shorter side does not depend on the orientation, so the rule holds after a 90° rotation.
  The M/8 scales libjpeg-turbo also offers (3/8, 5/8, …) decode slower than the full image here.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import DecodeError
from .exif import jpeg_meta, orient_array, orient_view

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (a 0.25 GB RGB image)
FAST_COLOURS = ("RGB", "YCbCr", "Gray")
# A reduced scale is taken only while the decoded shorter side stays ≥ 1.5 × min_side (Pillow's
# ``reducing_gap`` idea): straight to the target size, the DCT's box-like filter and the ½-pixel
# shift of odd sides cost 2–3 units of mean absolute difference on the final crop; with the gap
# ~0.5 (docs/architecture.md, decode). 1.5 still lets a 1024×768 JPEG decode at ½ for a 256 resize.
REDUCING_GAP = 1.5  # simplejpeg's header colourspaces it converts to RGB as PIL does

try:  # optional fast path
    import simplejpeg as _sj
except ImportError:  # pragma: no cover - exercised where simplejpeg is absent
    _sj = None


@dataclass
class DecodeStats:
    """How images were decoded, counted per worker (``merge`` adds another's; ``as_dict`` for results).
    ``fallback`` reasons: ``cmyk`` (CMYK/YCCK JPEG), ``exif`` (metadata the small EXIF reader leaves
    to PIL), ``refused`` (libjpeg-turbo refused the bytes), ``gpu`` (the GPU decoder refused them)."""

    fast: int = 0  # JPEGs decoded by libjpeg-turbo (simplejpeg)
    general: int = 0  # images decoded by PIL (other formats, and every fallback)
    reduced: int = 0  # of either, decoded at a reduced DCT scale
    gpu: int = 0  # JPEGs decoded on the GPU (nvJPEG, --decode cuda)
    failed: int = 0  # raised DecodeError: skipped (or raised under --on-error raise)
    fallback: dict = field(default_factory=dict)

    def fell(self, reason: str) -> None:
        self.fallback[reason] = self.fallback.get(reason, 0) + 1

    def merge(self, other: dict) -> None:
        for k, v in other.items():
            if k == "fallback":
                for r, n in v.items():
                    self.fallback[r] = self.fallback.get(r, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict:
        return {"fast": self.fast, "general": self.general, "reduced": self.reduced, "gpu": self.gpu,
                "failed": self.failed, "fallback": dict(self.fallback)}


def reduction(width: int, height: int, min_side: int | None) -> int:
    """The DCT scale denominator (8, 4, 2 or 1): the largest that keeps the shorter side ≥
    ``REDUCING_GAP`` × ``min_side``, so the resize after it still does most of the filtering."""
    if not min_side or min_side < 1:
        return 1
    short = min(width, height)
    for k in (8, 4, 2):
        if short // k >= REDUCING_GAP * min_side:
            return k
    return 1


def _too_large(w: int, h: int, max_pixels: int | None) -> None:
    if max_pixels and w * h > max_pixels:
        raise DecodeError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} (--max-pixels)", reason="too_large")


def _fast_jpeg(data: bytes, max_pixels: int | None, min_side: int | None, stats: DecodeStats,
               view: bool = False) -> np.ndarray | None:
    if _sj is None or not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        h, w, colorspace, _ = _sj.decode_jpeg_header(data)
    except (ValueError, RuntimeError):
        return stats.fell("refused")
    _too_large(w, h, max_pixels)
    if colorspace not in FAST_COLOURS:
        return stats.fell("cmyk")  # CMYK / YCCK: PIL converts those correctly
    orientation, _ = jpeg_meta(data)
    if orientation is None:
        return stats.fell("exif")
    k = reduction(w, h, min_side)
    try:  # min_height/min_width of exactly ceil(side / k): libjpeg-turbo picks the 1/k scale
        arr = _sj.decode_jpeg(data, colorspace="RGB", min_height=-(-h // k), min_width=-(-w // k)) if k > 1 else \
            _sj.decode_jpeg(data, colorspace="RGB")
    except (ValueError, RuntimeError):
        return stats.fell("refused")
    stats.fast += 1
    stats.reduced += arr.shape[0] < h
    return (orient_view if view else orient_array)(arr, orientation)


def _pil(data: bytes, max_pixels: int | None, min_side: int | None, stats: DecodeStats) -> np.ndarray:
    from PIL import Image, ImageOps

    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our own limit applies, checked before decoding
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            _too_large(w, h, max_pixels)
            k = reduction(w, h, min_side) if im.format == "JPEG" else 1
            if k > 1:  # PIL picks the largest 1/s scale that keeps size ≥ the request: exactly 1/k here
                im.draft(None, (w // k, h // k))
                stats.reduced += im.size[0] < w
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode.startswith("I;16") or mode in ("I", "F"):
                arr = np.asarray(im)
                if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
                    arr = (arr.astype(np.uint32) + 128) // 257  # 0..65535 → 0..255, rounded
                arr = np.clip(arr, 0, 255).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(arr[:, :, None], 3, axis=2))
            if mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im)
    except DecodeError:
        raise
    except Exception as e:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError, ...)
        raise DecodeError(f"cannot decode image: {type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, min_side: int | None = None,
                 stats: DecodeStats | None = None, view: bool = False) -> np.ndarray:
    """Decode to an (H, W, 3) uint8 RGB array. Raises DecodeError (reason ``decode_error``/``too_large``).

    ``min_side``: the shorter side the caller needs at least (None: full resolution); JPEGs may then
    come back smaller than their stored size, never with a shorter side below it. ``stats`` counts
    the path each image took. ``view``: an EXIF flip (orientations 2-4) may come back as a numpy
    view with negative strides instead of a contiguous copy, for consumers that handle it."""
    st = stats if stats is not None else DecodeStats()
    try:
        if not data:
            raise DecodeError("empty image bytes")
        arr = _fast_jpeg(data, max_pixels, min_side, st, view)
        if arr is None:
            arr = _pil(data, max_pixels, min_side, st)
            st.general += 1
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
            raise DecodeError(f"decoded to an unexpected shape {arr.shape}")
    except DecodeError:
        st.failed += 1
        raise
    return arr


def gpu_jpeg(data: bytes, max_pixels: int | None) -> int | None:
    """The EXIF orientation of a JPEG the GPU decoder can take (baseline or progressive Huffman,
    8-bit, gray or 3-component, within ``max_pixels``), else None: decode it on the CPU."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    orientation, frame = jpeg_meta(data)
    if orientation is None or frame is None:
        return None
    marker, h, w, ncomp = frame
    if marker not in (0xC0, 0xC1, 0xC2) or ncomp not in (1, 3) or not h or not w or (max_pixels and w * h > max_pixels):
        return None
    return orientation


def to_tensor(arr: np.ndarray):
    """(H, W, 3) uint8 array → (3, H, W) uint8 torch tensor (no copy when contiguous and writable)."""
    import torch

    if not arr.flags.writeable or min(arr.strides) < 0:  # PIL's read-only views; a flipped 1-pixel side (numpy calls it contiguous)
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
