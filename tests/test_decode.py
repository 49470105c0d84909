"""bytes -> (H, W, 3) uint8 RGB: EXIF, modes, 16-bit scaling, pixel limit, corrupt input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dataprune import decode
from dataprune.decode import decode_image, to_tensor
from dataprune.errors import DecodeError


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit RGB). color_type 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_rgb_jpeg_fast_path_matches_pil(mk):
    data = mk.jpeg(1, size=(20, 12))
    out = decode_image(data)
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(out.astype(int) - ref).max() <= 2  # libjpeg-turbo vs PIL's libjpeg: same maths, tiny rounding


@pytest.mark.parametrize("orientation, shape", [(1, (10, 30)), (3, (10, 30)), (6, (30, 10)), (8, (30, 10))])
def test_exif_orientation_applied(orientation, shape):
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, :5] = 255  # a white band on the left edge
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(save(im, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (*shape, 3)
    white = out.mean(axis=2) > 128
    if orientation == 1:
        assert white[:, :5].all() and not white[:, 10:].any()
    elif orientation == 3:  # rotated 180: band on the right
        assert white[:, -5:].all() and not white[:, :-10].any()
    elif orientation == 6:  # rotate 90 clockwise to display: left edge becomes the top
        assert white[:5, :].all() and not white[10:, :].any()
    else:  # 8: rotate 90 counter-clockwise: left edge becomes the bottom
        assert white[-5:, :].all() and not white[:-10, :].any()


def test_grayscale_jpeg_and_png():
    g = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    for data in (save(Image.fromarray(g, "L"), "JPEG", quality=100), save(Image.fromarray(g, "L"), "PNG")):
        out = decode_image(data)
        assert out.shape == (4, 16, 3)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        assert np.abs(out[..., 0].astype(int) - g).max() <= 3


def test_palette_with_transparency_and_rgba():
    p = Image.new("P", (4, 2))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    out = decode_image(save(p, "PNG", transparency=1))  # blue is "transparent": colour kept, alpha dropped
    assert out.shape == (2, 4, 3)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [0, 0, 255]
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = np.arange(9).reshape(3, 3) * 30
    out = decode_image(save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out == [200, 0, 0]).all()  # alpha dropped, not blended, as torchvision's pil_loader does
    la = np.stack([np.full((2, 2), 77, np.uint8), np.zeros((2, 2), np.uint8)], axis=2)
    assert (decode_image(save(Image.fromarray(la, "LA"), "PNG")) == 77).all()


def test_cmyk_jpeg():
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    out = decode_image(save(cmyk, "JPEG", quality=100))
    assert out.shape == (8, 8, 3)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r < 40 and g > 215 and b > 215


@pytest.mark.parametrize("color_type", [0, 2, 4, 6])
def test_16bit_scaled_not_clipped(color_type):
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    values = np.array([0, 257, 32768, 65535, 200], np.uint16)
    arr = np.repeat(values[None, :, None], channels, axis=2)
    if channels in (2, 4):
        arr[..., -1] = 65535  # opaque alpha
    out = decode_image(png16(arr if channels > 1 else arr[..., 0], color_type))
    assert out.shape == (1, 5, 3)
    got = out[0, :, 0].tolist()
    assert got[:4] == [0, 1, 128, 255]
    assert got[4] in (0, 1)  # 200/65535 of full scale is 0.8/255: rounded (gray) or floored (PIL's RGB), never 200


def test_16bit_tiff_and_32bit_modes():
    a = np.array([[0, 32768, 65535]], np.uint16)
    assert decode_image(save(Image.fromarray(a), "TIFF"))[0, :, 0].tolist() == [0, 128, 255]
    f = Image.fromarray(np.array([[0.0, 100.5, 300.0]], np.float32), "F")
    assert decode_image(save(f, "TIFF"))[0, :, 0].tolist() == [0, 100, 255]


def test_other_formats(mk):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for fmt in ("PNG", "BMP", "WEBP", "TIFF", "GIF"):
        kw = {"lossless": True} if fmt == "WEBP" else {}
        out = decode_image(save(Image.fromarray(arr), fmt, **kw))
        assert out.shape == (5, 7, 3), fmt
        if fmt not in ("GIF",):
            assert (out == arr).all(), fmt
    bw = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    assert decode_image(save(bw, "PNG"))[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_pixel_limit_before_decoding(mk, monkeypatch):
    # A PNG header announcing 100000 x 100000 pixels with no real data: decoding it would need 30 GB.
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(DecodeError) as e:
        decode_image(bomb)
    assert e.value.reason == "too_large" and "100000x100000" in str(e.value)
    # JPEG, on the fast path and on PIL's: the limit is checked from the header
    big = mk.jpeg(2, size=(64, 64))
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(decode, "_sj", None)
        with pytest.raises(DecodeError) as e:
            decode_image(big, max_pixels=64 * 64 - 1)
        assert e.value.reason == "too_large"
        assert decode_image(big, max_pixels=64 * 64).shape == (64, 64, 3)
    # PIL's own global limit is left as it was
    assert Image.MAX_IMAGE_PIXELS == 89_478_485 or Image.MAX_IMAGE_PIXELS is not None


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "header_only", "png_bad_crc"])
def test_corrupt_bytes_raise_decode_error(mk, damage):
    good = mk.jpeg(3, size=(32, 32))
    data = {
        "empty": b"",
        "garbage": b"not an image at all" * 10,
        "truncated": good[: len(good) // 2],
        "header_only": good[:20],
        "png_bad_crc": save(Image.new("RGB", (4, 4)), "PNG")[:-30] + b"\x00" * 30,
    }[damage]
    with pytest.raises(DecodeError) as e:
        decode_image(data)
    assert e.value.reason == "decode_error"


def test_to_tensor_layout(mk):
    arr = decode_image(mk.jpeg(4, size=(6, 4)))
    t = to_tensor(arr)
    assert tuple(t.shape) == (3, 4, 6) and str(t.dtype) == "torch.uint8"
    assert (t.permute(1, 2, 0).numpy() == arr).all()
