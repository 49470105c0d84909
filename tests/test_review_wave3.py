"""Review of 2963357 (EXIF flips as views, the eval transform flips only the crop) and be3beb2 (export
start-up without pandas): cases the commits' own tests do not reach.

A flip of an axis of length 1 (a 1-pixel-tall JPEG with orientation 3/4, a 1-pixel-wide one with 2/3)
is a negative stride numpy still calls C-contiguous, so ``np.ascontiguousarray`` hands it back as it
is and ``torch.from_numpy`` refuses it. The padded eval path (border mode, crop_pct > 1) takes
``to_tensor`` of the view itself and raised ValueError out of the score workers."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from dataprune.decode import DecodeStats, decode_image
from dataprune.engine.preprocess import Preprocess


def _jpeg(w: int, h: int, orientation: int, seed: int = 0) -> bytes:
    """A w × h JPEG (noise) with one Exif APP1 segment holding ``orientation``."""
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHIH2x", 0x0112, 3, 1, orientation) \
        + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


PADDED = [Preprocess(32, crop_mode="border"), Preprocess(32, crop_pct=1.15), Preprocess(32, crop_pct=1.15, interpolation="bicubic")]


@pytest.mark.parametrize("w, h, orientation", [(40, 1, 4), (40, 1, 3), (1, 40, 2), (1, 40, 3), (1, 1, 2), (1, 1, 3), (1, 1, 4)])
def test_flips_of_a_one_pixel_axis_preprocess_like_the_oriented_copy(w, h, orientation):
    data = _jpeg(w, h, orientation)
    st = DecodeStats()
    view, copy = decode_image(data, stats=st, view=True), decode_image(data)
    assert st.fast == 1 and (view == copy).all()
    for pre in PADDED:
        want = pre(copy)
        got = pre(view)  # ValueError (negative strides) from torch.from_numpy before the fix
        assert got.shape == want.shape == (32, 32, 3) and (got == want).all(), (pre, w, h, orientation)


def test_the_score_stream_takes_a_flipped_one_pixel_tall_jpeg(tmp_path, mk):
    """The same through the workers' loop (run_stream, decode on the CPU): the sample is scored with
    the pixels of its oriented copy, not a ValueError out of the DataLoader."""
    from dataprune.engine.batches import StreamSpec, Timings, run_stream
    from dataprune.sources import open_source

    images = [_jpeg(40, 1, 4, seed=1), _jpeg(48, 40, 1, seed=2)]
    mk.tar(str(tmp_path / "d" / "train-000.tar"), [m for i, img in enumerate(images) for m in mk.sample(f"s{i}", i, img)])
    src = open_source(str(tmp_path / "d"))
    pre = Preprocess(32, crop_mode="border")
    spec = StreamSpec(src.spec(), pre, batch_size=2, workers=0, decode="cpu")
    got = {}
    run_stream(spec, src.list_shards(), lambda b: {"px": b["images"].permute(0, 2, 3, 1).numpy().copy()},
               lambda i, base, rows, vals, err: got.update(base=base, rows=rows, vals=vals), Timings())
    assert list(got["rows"]) == [0, 1] and got["base"]["status"] == ["ok", "ok"]
    assert (got["vals"]["px"][0] == pre(decode_image(images[0]))).all()


# ----------------------------------------------------------- found on the way: older than both commits


def test_border_mode_on_a_very_thin_image_does_not_crash_the_stream(tmp_path, mk):
    """Border mode resizes the longer side to resize_side and the shorter one to round(h / ratio),
    which is 0 for a 1 × 600 image: torch (and PIL) raise on a 0-pixel resize, out of the workers.
    Pre-existing (not from 2963357): the sample should be scored (a 1-pixel side at least) or skipped
    with a reason, never a RuntimeError out of run_stream."""
    from dataprune.engine.batches import StreamSpec, Timings, run_stream
    from dataprune.sources import open_source

    images = [_jpeg(600, 1, 1, seed=3), _jpeg(48, 40, 1, seed=4)]
    mk.tar(str(tmp_path / "d" / "train-000.tar"), [m for i, img in enumerate(images) for m in mk.sample(f"s{i}", i, img)])
    src = open_source(str(tmp_path / "d"))
    spec = StreamSpec(src.spec(), Preprocess(224, crop_pct=0.875, crop_mode="border"), batch_size=2, workers=0, decode="cpu")
    got = {}
    run_stream(spec, src.list_shards(), lambda b: {"n": np.zeros(len(b["rows"]))},
               lambda i, base, rows, vals, err: got.update(base=base, rows=rows), Timings())
    assert got["base"]["status"][1] == "ok" and 1 in list(got["rows"])


def test_export_of_a_manifest_with_invalid_utf8_is_one_line_not_a_traceback(tmp_path, mk):
    """read_manifest promises names as UTF-8 strings, but Arrow does not validate string data on read:
    a manifest whose key bytes are not UTF-8 (a hand-made or damaged file) ended the export with a
    UnicodeDecodeError traceback from to_pylist. Pre-existing (not from be3beb2)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataprune.manifest import build_manifest
    from dataprune.tables import META_KEY, read_manifest

    mk.tar(str(tmp_path / "in" / "a-000.tar"), [m for i in range(3) for m in mk.sample(f"k{i}", i, _jpeg(8, 8, 1, seed=i))])
    good = str(tmp_path / "all.parquet")
    build_manifest(str(tmp_path / "in"), good)
    t, _ = read_manifest(good)
    raw = [k.encode() for k in t.column("key").to_pylist()]
    raw[1] = b"k\xce\x00x"
    offs = np.cumsum([0] + [len(x) for x in raw]).astype(np.int32)
    keys = pa.Array.from_buffers(pa.string(), len(raw), [None, pa.py_buffer(offs.tobytes()), pa.py_buffer(b"".join(raw))])
    bad = str(tmp_path / "bad.parquet")
    md = pq.read_schema(good).metadata
    pq.write_table(t.set_column(t.schema.get_field_index("key"), "key", keys).replace_schema_metadata({META_KEY: md[META_KEY]}), bad)
    p = mk.cli("export", bad, "--out", tmp_path / "out")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "bad.parquet" in p.stderr, p.stderr[-800:]
