"""Preprocessing of one decoded image: the model's own eval transform (timm's), and the proxy's
training augmentation. Pixels stay uint8 here; ``batches.Normalizer`` converts and normalises a
whole batch once, on the device.

Eval geometry, and why the crop is not taken before the resize: the antialiased resize's sampling
grid is fixed by the whole image's size (scale = H / resized H), so cropping the source at whole
pixels first shifts that grid by up to half a source pixel and cuts the filter's support at the
crop's edges. Measured on 40 ImageNet-size crops of scikit-image's photographs (bicubic,
crop_pct 0.95, one core): resize-then-crop is within 2 levels of timm's PIL transform (mean 0.003)
at 0.29 ms an image; crop-then-resize is off by up to 92 levels (mean 1.46) at 0.33 ms. So the whole
image is resized in uint8 and the crop is a view; large JPEGs get their saving earlier, from the
reduced-scale decode (``decode_min_side``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NATIVE_MAX = 64  # images no larger than this are scored at their own size when --image-size is not given
_TENSOR_FILTERS = ("bilinear", "bicubic")  # resized on uint8 tensors; others (nearest, box, lanczos, …) with PIL, as timm


@dataclass(frozen=True)
class Preprocess:
    """(H, W, 3) uint8 → the model's input, still uint8 (normalised later, once, on the device).

    Evaluation is timm's eval transform (``timm.data.create_transform(**cfg, is_training=False)``):
    ``crop_mode`` center resizes the shorter side to ``resize_side`` = floor(size / crop_pct) and
    centre-crops ``size``; squash resizes both sides to it; border resizes the longer side to it and
    pads with ``fill``. The resize is antialiased with the model's ``interpolation``, on uint8 tensors
    (torch's uint8 kernels: within 1–2 levels of PIL's, which timm uses). Training: see ``_train``."""

    size: int
    train: bool = False
    max_pixels: int | None = None
    crop_pct: float = 1.0  # eval: the share of the resized image the centre crop keeps (1: resize to size itself)
    interpolation: str = "bilinear"  # eval resize filter (timm's names)
    crop_mode: str = "center"
    fill: tuple = (0, 0, 0)  # border mode's padding, round(255 * mean)

    @property
    def resize_side(self) -> int:
        """The side the eval resize targets (timm: ``math.floor(size / crop_pct)``)."""
        return int(math.floor(self.size / self.crop_pct))

    @property
    def decode_min_side(self) -> int | None:
        """The shorter side a reduced-scale decode must keep at least: the eval resize's target
        (larger than what squash and border need, never smaller); None: training decodes in full."""
        return None if self.train else self.resize_side

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) of an h × w image after the eval resize, as timm computes it."""
        r = self.resize_side
        if self.crop_mode == "squash":
            return r, r
        if self.crop_mode == "border":  # timm ResizeKeepRatio(longest=1)
            ratio = max(h / r, w / r)
            return max(1, round(h / ratio)), max(1, round(w / ratio))  # (a 1 × 600 image keeps one row)
        if h <= w:  # torchvision Resize(int): the shorter side to r, the longer one truncated
            return r, int(r * w / h)
        return int(r * h / w), r

    def __call__(self, arr: np.ndarray, gen=None):
        """Evaluation: an (S, S, 3) uint8 array (the image itself when it is already the size with
        nothing to crop, batched without per-sample torch work, see EvalStream._batch)."""
        if self.train:
            return self._train(arr, gen)
        h, w = arr.shape[:2]
        if self.resized_shape(h, w) == (h, w) == (self.size, self.size):
            return arr
        if self.interpolation not in _TENSOR_FILTERS:
            return self._eval_pil(arr)
        return self._eval_view(arr)

    def _eval_view(self, arr: np.ndarray) -> np.ndarray:
        """The tensor-filter eval of an (H, W, 3) array that may be a flipped *view* of the stored
        pixels (``decode_image(view=True)``: negative strides). The stored image is resized and the
        crop box mirrored into its frame, then only the S × S crop is flipped, as a view: no
        full-size copy (0.3-0.5 ms an image). The result is a view too, which the batch stacking
        copies once. Exact: the antialiased resize commutes with flips (a symmetric filter, scale
        in/out per axis); tests/test_decode_fast.py checks it."""
        from ..decode import to_tensor

        h, w = arr.shape[:2]
        rh, rw = self.resized_shape(h, w)
        s = self.size
        if rh < s or rw < s:  # padded (border mode, crop_pct > 1): the plain path
            return np.ascontiguousarray(self.eval_tensor(to_tensor(arr)).permute(1, 2, 0).numpy())
        fv, fh = arr.strides[0] < 0, arr.strides[1] < 0
        base = arr[:: -1 if fv else 1, :: -1 if fh else 1]  # the stored pixels, positive strides
        top, left = int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))
        top, left = rh - top - s if fv else top, rw - left - s if fh else left
        x = to_tensor(base)
        if (rh, rw) != (h, w):
            import torchvision.transforms.v2.functional as TF
            from torchvision.transforms import InterpolationMode

            x = TF.resize(x, [rh, rw], interpolation=InterpolationMode(self.interpolation), antialias=True)
        return x[:, top : top + s, left : left + s].permute(1, 2, 0).numpy()[:: -1 if fv else 1, :: -1 if fh else 1]

    def eval_tensor(self, x):
        """The eval resize and crop of a (3, H, W) uint8 tensor on any device → (3, S, S) uint8."""
        import torchvision.transforms.v2.functional as TF
        from torchvision.transforms import InterpolationMode

        h, w = x.shape[-2:]
        shape = self.resized_shape(h, w)
        if shape != (h, w):
            x = TF.resize(x, list(shape), interpolation=InterpolationMode(self.interpolation), antialias=True)
        return self._crop_or_pad(x)

    def _crop_or_pad(self, x):
        """Centre crop to S × S; an image smaller than S (border mode, crop_pct > 1) is padded
        first — with ``fill`` in border mode, 0 otherwise — as timm / torchvision do."""
        import torch

        s, (h, w) = self.size, x.shape[-2:]
        if h < s or w < s:
            ph, pw = max(0, s - h), max(0, s - w)
            fill = self.fill if self.crop_mode == "border" else (0, 0, 0)
            out = torch.empty((3, h + ph, w + pw), dtype=x.dtype, device=x.device)
            out[:] = torch.tensor(fill, dtype=x.dtype, device=x.device).view(3, 1, 1)
            out[:, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w] = x
            x, (h, w) = out, out.shape[-2:]
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return x[:, top : top + s, left : left + s]

    def _eval_pil(self, arr: np.ndarray) -> np.ndarray:
        """Filters torch lacks or samples otherwise (nearest, box, hamming, lanczos): PIL's resize, as timm runs it."""
        from PIL import Image

        from ..decode import to_tensor

        h, w = arr.shape[:2]
        rh, rw = self.resized_shape(h, w)
        if (rh, rw) != (h, w):
            im = Image.fromarray(np.ascontiguousarray(arr)).resize((rw, rh), getattr(Image.Resampling, self.interpolation.upper()))
            arr = np.asarray(im)
        return np.ascontiguousarray(self._crop_or_pad(to_tensor(arr)).permute(1, 2, 0).numpy())

    def _train(self, arr: np.ndarray, gen):
        """(H, W, 3) uint8 → (3, S, S) uint8 tensor: at ≤ NATIVE_MAX px CIFAR-style (resize, pad 4
        reflect, random crop, flip), else a random-resized crop (scale 0.35–1) and flip."""
        import torch
        import torchvision.transforms.v2.functional as TF

        from ..decode import to_tensor

        x, s = to_tensor(arr), self.size
        h, w = x.shape[-2:]
        if s <= NATIVE_MAX:  # CIFAR-style: resize, pad 4 (reflect), random crop, flip
            if (h, w) != (s, s):
                x = TF.center_crop(TF.resize(x, s, antialias=True), [s, s])
            x = TF.pad(x, [4, 4, 4, 4], padding_mode="reflect")
            i, j = torch.randint(0, 9, (2,), generator=gen).tolist()
            x = x[:, i : i + s, j : j + s]
        else:  # random-resized crop, scale (0.35, 1)
            area = h * w * float(torch.empty(1).uniform_(0.35, 1.0, generator=gen))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
            cw, ch = min(w, int(round(math.sqrt(area * ratio)))), min(h, int(round(math.sqrt(area / ratio))))
            i = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            j = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            x = TF.resize(x[:, i : i + ch, j : j + cw], [s, s], antialias=True)
        if bool(torch.randint(0, 2, (1,), generator=gen)):
            x = x.flip(-1)
        return x.contiguous()
