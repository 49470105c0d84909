"""Image bytes → uint8 RGB pixels (H, W, 3 numpy array; ``to_tensor`` gives C, H, W torch).

* EXIF orientation is applied.
* Grayscale, palette (with transparency), RGBA/LA (alpha dropped, as torchvision's loader does),
  CMYK, YCbCr and 16-bit images become 8-bit RGB; 16-bit values are scaled (÷257), never clipped.
* A pixel-count limit guards against decompression bombs; it is checked from the header, before
  any pixel is decoded.
* JPEGs without EXIF go through simplejpeg (libjpeg-turbo) when it is installed; everything else,
  and anything simplejpeg refuses, goes through PIL.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from .errors import DecodeError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (a 0.25 GB RGB image)

try:  # optional fast path
    import simplejpeg as _sj
except ImportError:  # pragma: no cover - exercised where simplejpeg is absent
    _sj = None


def _too_large(w: int, h: int, max_pixels: int | None) -> None:
    if max_pixels and w * h > max_pixels:
        raise DecodeError(f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} (--max-pixels)", reason="too_large")


def _fast_jpeg(data: bytes, max_pixels: int | None) -> np.ndarray | None:
    if _sj is None or not data.startswith(b"\xff\xd8\xff") or data.find(b"Exif\x00\x00", 0, 65536) >= 0:  # no copy
        return None
    try:
        h, w, colorspace, _ = _sj.decode_jpeg_header(data)
    except (ValueError, RuntimeError):
        return None
    _too_large(w, h, max_pixels)
    if colorspace not in ("RGB", "YCbCr", "Gray"):
        return None  # CMYK / YCCK: PIL converts those correctly
    try:
        return _sj.decode_jpeg(data, colorspace="RGB")
    except (ValueError, RuntimeError):
        return None


def _pil(data: bytes, max_pixels: int | None) -> np.ndarray:
    from PIL import Image, ImageOps

    old = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our own limit applies, checked before decoding
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            _too_large(im.size[0], im.size[1], max_pixels)
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


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to an (H, W, 3) uint8 RGB array. Raises DecodeError (reason ``decode_error``/``too_large``)."""
    if not data:
        raise DecodeError("empty image bytes")
    arr = _fast_jpeg(data, max_pixels)
    if arr is None:
        arr = _pil(data, max_pixels)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise DecodeError(f"decoded to an unexpected shape {arr.shape}")
    return arr


def to_tensor(arr: np.ndarray):
    """(H, W, 3) uint8 array → (3, H, W) uint8 torch tensor (no copy when contiguous and writable)."""
    import torch

    if not arr.flags.writeable:  # PIL hands out read-only views
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
