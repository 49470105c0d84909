"""The fast decode paths: EXIF orientation read without PIL, reduced-DCT-scale decode, the per-image
fallbacks and their counters, the GPU decode's CPU-side choices and `--decode` on the command line.

Images are synthesised with PIL (Mandelbrot + noise at odd sizes: no symmetry an orientation could
hide behind); no real photographs are needed here (benchmarks/bench_datapath.py uses them)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dataprune.decode import DecodeStats, decode_image, gpu_jpeg, reduction
from dataprune.decode.cuda import use_gpu_decode
from dataprune.decode.exif import jpeg_orientation, orient_array, orient_tensor
from dataprune.errors import ConfigError, DecodeError

assert __import__("importlib").util.find_spec("simplejpeg"), "simplejpeg is a declared test dependency: the fast path is under test"

CROP_MAD = 1.5  # documented bound on the reduced-vs-full mean absolute difference of final crops (0-255; ~0.5 measured)


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.effect_mandelbrot((w, h), (-2.1, -1.2, 0.9, 1.3), 60).convert("L"), np.int16)
    rgb = np.stack([base, np.roll(base, w // 7, axis=1), 255 - base], axis=2) + rng.normal(0, 4, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def jpeg(im: Image.Image, exif: bytes = b"", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=kw.pop("quality", 90), exif=exif, **kw)
    return buf.getvalue()


def exif_bytes(orientation: int, big_endian: bool = False, typ: int = 3, count: int = 1) -> bytes:
    """An APP1 payload (without ``Exif\\0\\0``) holding IFD0 with a camera make and the orientation."""
    e = ">" if big_endian else "<"
    head = (b"MM\x00*" if big_endian else b"II*\x00") + struct.pack(e + "I", 8)
    entries = [struct.pack(e + "HHI4s", 0x010F, 2, 4, b"cam\x00"),
               struct.pack(e + "HHIH2x", 0x0112, typ, count, orientation)]
    return head + struct.pack(e + "H", len(entries)) + b"".join(entries) + struct.pack(e + "I", 0)


def with_app1(data: bytes, payload: bytes) -> bytes:
    """``data`` (a JPEG) with one more APP1 segment right after SOI."""
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def pil_reference(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_fast_path_pixel_exact_with_pil(orientation, big_endian, progressive):
    data = with_app1(jpeg(photo(61, 37), progressive=progressive), b"Exif\x00\x00" + exif_bytes(orientation, big_endian))
    assert jpeg_orientation(data) == orientation
    st = DecodeStats()
    out = decode_image(data, stats=st)
    ref = pil_reference(data)
    assert out.shape == ref.shape == ((37, 61, 3) if orientation < 5 else (61, 37, 3))
    assert st.fast == 1 and st.general == 0 and not st.fallback
    assert (out == ref).all()  # both libjpeg-turbo, same settings: pixel-exact


@pytest.mark.parametrize("crop_pct, interpolation", [(0.95, "bicubic"), (0.875, "bilinear"), (1.0, "bicubic")])
def test_flipped_views_give_the_oriented_copys_crop_exactly(crop_pct, interpolation):
    """The score workers decode with ``view=True``: flips (2, 3, 4) come back as views of the stored
    pixels, the eval transform resizes the stored image and flips only the crop. Same pixels as
    orienting a copy first, for every orientation; transposes are still copied."""
    from dataprune.engine.preprocess import Preprocess

    pre = Preprocess(224, crop_pct=crop_pct, interpolation=interpolation)
    for w, h in ((333, 250), (250, 333), (301, 301)):
        for o in range(1, 9):
            data = with_app1(jpeg(photo(w, h, seed=o)), b"Exif\x00\x00" + exif_bytes(o))
            st = DecodeStats()
            copy, view = decode_image(data), decode_image(data, stats=st, view=True)
            assert st.fast == 1 and jpeg_orientation(data) == o
            assert view.shape == copy.shape and (view == copy).all()
            assert copy.flags.c_contiguous and (view.flags.c_contiguous == (o not in (2, 3, 4)))
            a, b = pre(copy), pre(view)
            assert a.shape == b.shape == (224, 224, 3)
            assert (a == b).all(), (w, h, o)


def test_pil_written_exif_and_orientation_helpers():
    im = photo(45, 29)
    arr = np.asarray(im)
    for o in range(1, 9):
        ex = Image.Exif()
        ex[0x0112] = o
        data = jpeg(im, ex.tobytes())
        assert jpeg_orientation(data) == o
        assert (decode_image(data) == pil_reference(data)).all()
        # the numpy and torch versions agree with PIL's transpose on raw pixels
        method = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}.get(o)
        ref = np.asarray(im if method is None else im.transpose(method))
        assert (orient_array(arr, o) == ref).all()
        t = orient_tensor(torch.from_numpy(arr.copy()).permute(2, 0, 1), o)
        assert (t.permute(1, 2, 0).numpy() == ref).all()


@pytest.mark.parametrize("case", ["bad_magic", "ifd_out_of_range", "truncated_entries", "long_type", "two_values",
                                  "two_exif_segments", "xmp_orientation", "bad_segment_length"])
def test_unusual_exif_goes_to_pil_and_is_counted(case):
    im = photo(40, 24)
    plain = jpeg(im)
    good = b"Exif\x00\x00" + exif_bytes(6)
    data = {
        "bad_magic": with_app1(plain, b"Exif\x00\x00XX*\x00" + good[10:]),
        "ifd_out_of_range": with_app1(plain, b"Exif\x00\x00II*\x00" + struct.pack("<I", 4000) + good[14:]),
        "truncated_entries": with_app1(plain, good[:24]),
        "long_type": with_app1(plain, b"Exif\x00\x00" + exif_bytes(6, typ=4)),
        "two_values": with_app1(plain, b"Exif\x00\x00" + exif_bytes(6, count=2)),
        "two_exif_segments": with_app1(with_app1(plain, good), good),
        "xmp_orientation": with_app1(plain, b"http://ns.adobe.com/xap/1.0/\x00<x tiff:Orientation=\"6\"/>"),
        "bad_segment_length": plain[:2] + b"\xff\xe1\x00\x01" + plain[2:],
    }[case]
    assert jpeg_orientation(data) is None
    st = DecodeStats()
    try:
        ref = pil_reference(data)
    except Exception:
        ref = None
    if ref is None:
        with pytest.raises(DecodeError):
            decode_image(data, stats=st)
        assert st.failed == 1
    else:
        out = decode_image(data, stats=st)
        assert (out == ref).all()
        assert st.general == 1
    assert st.fallback == {"exif": 1}


@pytest.mark.filterwarnings("ignore")
def test_random_damage_to_exif_never_disagrees_with_pil():
    rng = np.random.default_rng(0)
    plain = jpeg(photo(33, 21))
    good = bytearray(b"Exif\x00\x00" + exif_bytes(8))
    for _ in range(150):
        bad = bytearray(good)
        for i in rng.integers(6, len(bad), rng.integers(1, 4)):
            bad[i] = int(rng.integers(0, 256))
        data = with_app1(plain, bytes(bad))
        try:
            ref = pil_reference(data)
        except Exception:  # PIL may fail re-writing the damaged EXIF after its transpose: we may not
            try:
                assert decode_image(data).shape[2] == 3
            except DecodeError:
                pass
            continue
        assert (decode_image(data) == ref).all()


@pytest.mark.parametrize("w, h, orientation", [(1024, 768, 1), (1024, 768, 6), (768, 1024, 8), (2048, 1200, 1)])
def test_reduced_scale_decode_close_to_full_on_the_final_crop(w, h, orientation):
    from dataprune.engine.batches import Preprocess

    ex = Image.Exif()
    ex[0x0112] = orientation
    data = jpeg(photo(w, h, seed=w + orientation), ex.tobytes())
    pre = Preprocess(224, crop_pct=0.875)
    side = pre.decode_min_side
    st = DecodeStats()
    small = decode_image(data, min_side=side, stats=st)
    full = decode_image(data)
    k = reduction(w, h, side)
    assert k >= 2 and st.reduced == 1 and st.fast == 1
    assert min(small.shape[:2]) >= 1.5 * side  # never below the reducing gap; the short side stays short after rotation
    assert small.shape[:2] == (-(-full.shape[0] // k), -(-full.shape[1] // k))
    mad = np.abs(np.asarray(pre(small), np.float32) - np.asarray(pre(full), np.float32)).mean()
    assert mad < CROP_MAD


def test_small_images_and_exact_requests_are_decoded_in_full():
    data = jpeg(photo(500, 375))
    st = DecodeStats()
    assert decode_image(data, min_side=224, stats=st).shape == (375, 500, 3)  # 375 // 2 < 1.5 × 224
    assert decode_image(data, min_side=None, stats=st).shape == (375, 500, 3)
    assert st.reduced == 0 and st.fast == 2
    assert reduction(4000, 3000, 224) == 8 and reduction(4000, 3000, 0) == 1


def test_cmyk_goes_to_pil_counted_and_is_reduced_there_too():
    im = photo(1024, 768).convert("CMYK")
    data = jpeg(im)
    st = DecodeStats()
    full = decode_image(data, stats=st)
    assert (full == np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).all()
    small = decode_image(data, min_side=224, stats=st)
    assert small.shape == (384, 512, 3)
    assert st.fallback == {"cmyk": 2} and st.general == 2 and st.reduced == 1 and st.fast == 0


def test_progressive_grey_and_16_bit_paths_counted():
    st = DecodeStats()
    prog = jpeg(photo(800, 600), progressive=True)
    assert decode_image(prog, min_side=100, stats=st).shape == (150, 200, 3)
    grey = jpeg(photo(64, 48).convert("L"))
    assert (decode_image(grey, stats=st) == np.asarray(Image.open(io.BytesIO(grey)).convert("RGB"))).all()
    assert st.fast == 2 and st.reduced == 1
    arr = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")  # a 16-bit grey PNG
    out = decode_image(buf.getvalue(), min_side=2, stats=st)  # not a JPEG: never reduced
    assert out.shape == (3, 4, 3) and out[2, 3, 0] == (55000 + 128) // 257
    assert st.general == 1 and st.reduced == 1 and not st.fallback


@pytest.mark.parametrize("damage", ["truncated", "scan_garbage", "header_only"])
def test_broken_jpegs_fall_back_then_fail_counted(damage):
    good = jpeg(photo(120, 90))
    data = {"truncated": good[: len(good) // 2],
            "scan_garbage": good[:-200] + bytes(range(190)) + good[-10:],
            "header_only": good[:300]}[damage]
    st = DecodeStats()
    try:
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception:
        ref = None
    if ref is None:
        with pytest.raises(DecodeError):
            decode_image(data, min_side=32, stats=st)
        assert st.failed == 1
    else:  # libjpeg-turbo (strict) refused what PIL still decodes
        assert decode_image(data, stats=st).shape == ref.shape
    assert st.fallback.get("refused", 0) + st.fast == 1


def test_gpu_candidates():
    assert gpu_jpeg(jpeg(photo(40, 30)), None) == 1
    assert gpu_jpeg(jpeg(photo(40, 30), progressive=True), None) == 1
    ex = Image.Exif()
    ex[0x0112] = 6
    assert gpu_jpeg(jpeg(photo(40, 30), ex.tobytes()), None) == 6
    assert gpu_jpeg(jpeg(photo(40, 30).convert("CMYK")), None) is None  # 4 components: the CPU converts it
    assert gpu_jpeg(jpeg(photo(40, 30)), 100) is None  # above --max-pixels: the CPU raises the right error
    assert gpu_jpeg(b"\x89PNG\r\n\x1a\n", None) is None
    assert gpu_jpeg(b"\xff\xd8\xff\xe0\x00", None) is None


def test_decode_mode_resolution():
    assert use_gpu_decode("cpu", True) is False
    assert use_gpu_decode("auto", False) is False
    assert use_gpu_decode("cuda", True, hashes=True) is False  # the embedding cache hashes CPU-decoded pixels
    with pytest.raises(ConfigError, match="CUDA"):
        use_gpu_decode("cuda", False)


def test_stream_counts_decode_paths(tmp_path, mk):
    """run_stream sums the workers' DecodeStats into Timings.decode_paths; exact_decode turns off reduction."""
    from dataprune.engine.batches import Preprocess, StreamSpec, Timings, run_stream
    from dataprune.sources import open_source

    images = [jpeg(photo(1024, 768, seed=i)) for i in range(3)] + [jpeg(photo(1024, 768).convert("CMYK")), b"broken"]
    members = [m for i, img in enumerate(images) for m in mk.sample(f"s{i}", i % 2, img)]
    mk.tar(str(tmp_path / "d" / "train-000.tar"), members)
    src = open_source(str(tmp_path / "d"))
    for exact in (False, True):
        spec = StreamSpec(src.spec(), Preprocess(64), batch_size=2, workers=0, decode="cpu", exact_decode=exact)
        t, got = Timings(), {}
        run_stream(spec, src.list_shards(), lambda b: {"n": np.full(len(b["rows"]), b["images"].shape[-1])},
                   lambda i, base, rows, vals, err: got.update(base=base, rows=rows, vals=vals), t)
        p = t.decode_paths
        assert p["fast"] == 3 and p["general"] == 1 and p["failed"] == 1 and p["fallback"] == {"cmyk": 1}
        assert p["reduced"] == (0 if exact else 4)
        assert list(got["rows"]) == [0, 1, 2, 3] and got["base"]["status"][4] == "decode_error"
        assert set(got["vals"]["n"]) == {64}


def _score_args(tmp_path, *extra):
    from dataprune.demo import make_demo

    make_demo(str(tmp_path / "data"), n=8, shard_size=8)
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=10).state_dict().items()},
              str(tmp_path / "m.safetensors"))
    return ["score", tmp_path / "data", "--metric", "entropy", "--epochs", "0", "--model", "test_resnet",
            "--checkpoint", tmp_path / "m.safetensors", "--out", tmp_path / "s", *extra]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cli_decode_cuda_without_cuda_is_exit_2_and_auto_falls_back(tmp_path, mk):
    args = _score_args(tmp_path)
    p = mk.cli(*args, "--decode", "cuda")
    assert p.returncode == 2 and "--decode cuda" in p.stderr and "CUDA" in p.stderr and "Traceback" not in p.stderr
    p = mk.cli(*args, "--decode", "gpu")
    assert p.returncode == 2 and "--decode must be auto, cpu or cuda" in p.stderr
    p = mk.cli(*args, "--decode", "auto", "--json")
    assert p.returncode == 0, p.stderr
    import json

    r = json.loads(p.stdout)
    assert r["device"] == "cpu" and r["timings"]["decode_paths"]["gpu"] == 0 and r["timings"]["decode_paths"]["fast"] == 8
    assert "--exact-decode" in mk.cli("score", "--help").stdout


def test_gpu_batch_assembly_logic_on_the_cpu(tmp_path, mk):
    """The --decode cuda branch's batch assembly run with torchvision's CPU decoder (no GPU here):
    JPEGs handed over undecoded, one broken JPEG failing the batched call (re-decoded one by one,
    then on the CPU, then skipped with its reason), a CMYK one decoded by the worker, rows in order."""
    from dataprune.engine.batches import EvalStream, Preprocess, StreamSpec, _decode_on_gpu
    from dataprune.sources import open_source

    ex = Image.Exif()
    ex[0x0112] = 6
    good = [jpeg(photo(300, 200, seed=i), ex.tobytes() if i == 1 else b"") for i in range(3)]
    broken = good[0][: len(good[0]) // 3]  # headers intact: the worker hands it over, every decoder fails on it
    images = [good[0], broken, jpeg(photo(300, 200).convert("CMYK")), good[1], good[2]]
    mk.tar(str(tmp_path / "d" / "train-000.tar"), [m for i, img in enumerate(images) for m in mk.sample(f"s{i}", 0, img)])
    src = open_source(str(tmp_path / "d"))
    pre = Preprocess(64, crop_pct=0.875)
    spec = StreamSpec(src.spec(), pre, batch_size=8, workers=0, decode="cuda")
    (batch,) = list(EvalStream(spec, src.list_shards()))
    assert [i for i, _ in batch["gpu"].value] == [0, 1, 3, 4] and tuple(batch["images"].shape) == (1, 3, 64, 64)
    skips, paths = [], DecodeStats()
    _decode_on_gpu(batch, spec, skips, paths, device="cpu")
    assert batch["rows"].tolist() == [0, 2, 3, 4] and tuple(batch["images"].shape) == (4, 3, 64, 64)
    assert [(row, reason) for row, reason, _ in skips] == [(1, "decode_error")] and "s1" in skips[0][2]
    assert paths.gpu == 3 and paths.fallback == {"gpu": 1, "refused": 1} and paths.failed == 1  # GPU, libjpeg-turbo, PIL
    for k, i in enumerate([0, 2, 3, 4]):  # the same pixels as the CPU path, within libjpeg's rounding
        cpu = torch.from_numpy(np.asarray(pre(decode_image(images[i], min_side=pre.decode_min_side)))).permute(2, 0, 1)
        assert (batch["images"][k].int() - cpu.int()).abs().float().mean() < 1.0
    with pytest.raises(DecodeError, match="s1"):
        (batch,) = list(EvalStream(spec, src.list_shards()))
        _decode_on_gpu(batch, StreamSpec(src.spec(), pre, 8, 0, on_error="raise", decode="cuda"), [], DecodeStats(), device="cpu")
