"""The eval transform is timm's: parity with ``timm.data.create_transform(**cfg, is_training=False)``.

Real-size JPEGs (short side 300–500 px, ImageNet-like aspect ratios, and one 1024 × 768), with
photo-like content drawn by PIL (smooth shading, edges, texture, blur, sensor noise), are decoded
once by ``dataprune.decode``; the same pixels go through timm's transform (PIL resize, crop,
ToTensor, Normalize) and through ours (uint8 tensor resize, crop view, ``Normalizer``).

Tolerance, per image on the normalised tensors: mean |Δ| ≤ 5e-3 and max |Δ| ≤ 0.08 (4.6 uint8
levels at std 0.225). Measured here and on scikit-image's photographs: mean 2e-5–8e-5 and max one
level (0.0175) in centre mode; the worst case is squash with one side shrunk and the other grown
(500 × 375 → 384 × 384: 11 % of pixels one level off, mean 2.0e-3, max two levels) — torch's uint8
resize kernels round their fixed-point weights differently from PIL's, which timm runs.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

MEAN_TOL, MAX_TOL = 5e-3, 0.08
SIZES = [(400, 300), (375, 500), (500, 333), (453, 340), (1024, 768)]  # (width, height)


def _photo(w: int, h: int, seed: int, quality: int) -> bytes:
    """A JPEG with photo-like statistics: shaded background, shapes with edges, texture, blur, noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * (x / w) + rng.uniform(-60, 60) * (y / h)
                     for _ in range(3)], -1)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(25):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(10, w // 2), y0 + rng.integers(10, h // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=colour)
    for _ in range(40):
        d.line([tuple(int(v) for v in rng.integers(0, max(w, h), 2)) for _ in range(2)],
               fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(rng.integers(1, 4)))
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    arr = np.asarray(im).astype(np.float32)
    arr += 8 * np.sin(x / rng.uniform(2, 6))[..., None] * (rng.random((1, 1, 3)) > 0.5)  # fine texture
    arr += rng.normal(0, 4, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    from dataprune.decode import decode_image

    return [decode_image(_photo(w, h, i, 75 + 5 * i)) for i, (w, h) in enumerate(SIZES)]


def _model_cfg(name: str) -> dict:
    import timm
    import torch

    with torch.device("meta"):  # pretrained=False: no weights, the pretrained_cfg is still resolved
        model = timm.create_model(name, pretrained=False, num_classes=10)
    return timm.data.resolve_model_data_config(model)


def _ours(arr: np.ndarray, cfg: dict, size: int | None = None):
    import torch

    from dataprune.engine.batches import Normalizer
    from dataprune.engine.planning import eval_preprocess

    size = size or cfg["input_size"][-1]
    pre = eval_preprocess(size, None, {k: cfg[k] for k in ("crop_pct", "interpolation", "crop_mode")}, cfg["mean"])
    x = torch.from_numpy(np.stack([pre(arr)])).permute(0, 3, 1, 2)
    return Normalizer(cfg["mean"], cfg["std"], torch.device("cpu"), True)(x)[0], pre


def _timm(arr: np.ndarray, cfg: dict):
    import timm
    from PIL import Image

    return timm.data.create_transform(**cfg, is_training=False)(Image.fromarray(arr))


def _check(photos, cfg: dict, size: int | None = None) -> list[float]:
    means = []
    for arr in photos:
        ours, _ = _ours(arr, cfg, size)
        ref = _timm(arr, cfg)
        assert ours.shape == ref.shape
        diff = (ours - ref).abs()
        assert float(diff.mean()) <= MEAN_TOL and float(diff.max()) <= MAX_TOL, (arr.shape, float(diff.mean()), float(diff.max()))
        means.append(float(diff.mean()))
    return means


@pytest.mark.parametrize("name", ["resnet50", "resnet18.tv_in1k", "vit_small_patch16_224", "convnext_tiny.fb_in22k_ft_in1k_384"])
def test_parity_with_timm_create_transform(photos, name):
    """resnet50: bicubic, crop_pct 0.95 · resnet18.tv_in1k: bilinear, 0.875 · ViT-S: bicubic, 0.9,
    mean/std 0.5 · convnext_tiny 384: squash at 384, crop_pct 1."""
    cfg = _model_cfg(name)
    expected = {"resnet50": ("bicubic", 0.95, "center"), "resnet18.tv_in1k": ("bilinear", 0.875, "center"),
                "vit_small_patch16_224": ("bicubic", 0.9, "center"), "convnext_tiny.fb_in22k_ft_in1k_384": ("bicubic", 1.0, "squash")}
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == expected[name]
    _check(photos, cfg)


def test_parity_in_border_mode_and_with_an_image_size_override(photos):
    """Border mode (longer side to floor(S / crop_pct), padded with the mean colour) on a hand-made
    config; and --image-size 288 for resnet50: timm's resolve_data_config keeps the model's crop_pct
    and interpolation, so do we."""
    import timm
    import torch

    cfg = dict(_model_cfg("resnet50"), crop_mode="border", crop_pct=0.9)
    _check(photos, cfg)
    with torch.device("meta"):
        model = timm.create_model("resnet50", pretrained=False)
    cfg288 = timm.data.resolve_data_config({"input_size": (3, 288, 288)}, model=model)
    assert cfg288["crop_pct"] == 0.95
    _check(photos, cfg288, size=288)


def test_resize_side_is_timms_scale_size_and_bounds_the_decode():
    """floor(S / crop_pct), as timm's transforms_imagenet_eval computes the Resize target; a
    reduced-scale decode may never go below it."""
    import timm

    from dataprune.engine.planning import eval_preprocess

    for name in ("resnet50", "resnet18.tv_in1k", "vit_small_patch16_224"):
        cfg = _model_cfg(name)
        tf = timm.data.create_transform(**cfg, is_training=False)
        pre = eval_preprocess(224, None, cfg, cfg["mean"])
        assert pre.resize_side == tf.transforms[0].size == math.floor(224 / cfg["crop_pct"])
        assert pre.decode_min_side == pre.resize_side
        assert pre.resized_shape(375, 500) == (pre.resize_side, int(pre.resize_side * 500 / 375))
    train = eval_preprocess(224, None, _model_cfg("resnet50"))
    assert type(train)(224, True).decode_min_side is None  # training decodes at full resolution


def test_native_size_images_are_used_as_they_are():
    """At ≤ NATIVE_MAX px (CIFAR-style) crop_pct is 1 whatever the model's: a native 32 × 32 image
    is passed through untouched (the very array), a 40 × 28 one is resized and centre-cropped."""
    from dataprune.engine.planning import eval_preprocess

    cfg = _model_cfg("resnet50")
    pre = eval_preprocess(32, None, cfg, cfg["mean"])
    assert (pre.crop_pct, pre.crop_mode, pre.interpolation) == (1.0, "center", "bicubic")
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert pre(arr) is arr
    assert pre(np.zeros((28, 40, 3), np.uint8)).shape == (32, 32, 3)


def test_normalizer_matches_the_plain_formula_and_reuses_its_buffer():
    import torch

    from dataprune.engine.batches import Normalizer

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    norm = Normalizer(mean, std, torch.device("cpu"), True)
    for n in (5, 3, 5, 7):  # a smaller last batch, then larger ones: views of, or a new, buffer
        x = torch.randint(0, 256, (n, 9, 11, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        want = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        got = norm(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert float((got - want).abs().max()) < 1e-5
    nchw = norm(torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8))  # the training loader's layout
    assert nchw.shape == (2, 3, 9, 11)


def test_the_plan_carries_the_models_transform(tmp_path):
    """plan() reads crop_pct / interpolation / crop mode from the model's timm config and the stream
    spec's preprocessing applies them; the table metadata records them."""
    from PIL import Image

    from dataprune.engine import ScoreConfig
    from dataprune.engine.planning import plan

    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((300, 400, 3), 60 * i, np.uint8)).save(tmp_path / "data" / c / f"{i}.jpg")
    p = plan(ScoreConfig(data=str(tmp_path / "data"), metrics=("el2n",), out=str(tmp_path / "out"),
                         model="resnet18.tv_in1k", epochs=1, device="cpu"))
    pre = p.stream(cuda=False).pre
    assert (p.image_size, pre.crop_pct, pre.interpolation, pre.crop_mode, pre.resize_side) == (224, 0.875, "bilinear", "center", 256)
    assert p.meta["eval_transform"] == {"size": 224, "resize": 256, "crop_pct": 0.875, "interpolation": "bilinear",
                                        "crop_mode": "center"}


@pytest.mark.parametrize("cpus,pixels,want", [
    (2, 32 * 32, 0),  # CIFAR-size: decoding is nearly free, a worker would preempt a model thread
    (2, 500 * 375, 1),  # ImageNet-size: decode beside the forward instead of in series with it
    (4, 1024 * 768, 1),
    (1, 500 * 375, 0),  # one core: nothing to overlap with
    (2, None, 0),  # nothing decoded (yet): the small-image rule
    (16, 500 * 375, 2),
])
def test_auto_workers_decode_real_size_images_beside_the_forward(monkeypatch, cpus, pixels, want):
    import torch

    from dataprune.engine import planning

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(planning, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(torch, "get_num_threads", lambda: cpus)
    assert planning.auto_workers(False, pixels) == want


def test_checkpoint_hash_is_cached_by_file_identity(tmp_path):
    """OUT's hash cache answers for the same file only: rewriting it (size or mtime) hashes again."""
    import os

    from dataprune.models import checkpoint_hash, file_sha256

    ck, cache = tmp_path / "m.safetensors", tmp_path / "cache.json"
    ck.write_bytes(b"a" * 1000)
    h, entry = checkpoint_hash(str(ck), str(cache))
    assert h == file_sha256(str(ck))
    import json

    cache.write_text(json.dumps({**entry, "sha256": "0123456789abcdef"}))  # a cached answer is used as it is
    assert checkpoint_hash(str(ck), str(cache))[0] == "0123456789abcdef"
    ck.write_bytes(b"b" * 1000)
    os.utime(ck, ns=(1, 1))
    assert checkpoint_hash(str(ck), str(cache))[0] == file_sha256(str(ck))
    cache.write_text("{not json")
    assert checkpoint_hash(str(ck), str(cache))[0] == file_sha256(str(ck))


def test_a_checkpoint_loads_into_a_meta_model_with_the_models_dtypes(tmp_path):
    """Weights are loaded once (no random init first), fp16 files become the model's fp32, and a
    model with state the file does not hold (non-persistent buffers) is built the ordinary way."""
    import timm
    import torch
    from safetensors.torch import save_file

    from dataprune.models import ModelSpec, create_model

    for name in ("test_resnet", "test_vit"):
        torch.manual_seed(0)
        ref = timm.create_model(name, num_classes=3).eval()
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in ref.state_dict().items()},
                  str(tmp_path / f"{name}.safetensors"))
        m = create_model(ModelSpec(name, 3, False, str(tmp_path / f"{name}.safetensors"))).eval()
        assert not any(t.is_meta for t in (*m.parameters(), *m.buffers()))
        assert {p.dtype for p in m.parameters()} == {torch.float32} and all(p.requires_grad for p in m.parameters())
        x = torch.randn(2, 3, *ref.pretrained_cfg["input_size"][1:])
        with torch.no_grad():
            assert float((m(x) - ref(x)).abs().max()) < 1e-2  # fp16 rounding of the weights
