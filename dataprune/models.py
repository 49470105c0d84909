"""Model creation (timm), safe checkpoint loading, and the model's data config.

Checkpoints: ``.safetensors`` (preferred), or ``.pt``/``.pth``/``.bin`` loaded with
``torch.load(weights_only=True)`` — a pickle that tries to build arbitrary objects (i.e. run code)
is refused. ``--pretrained`` goes through timm / the Hugging Face hub as usual (needs network).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Small and picklable: enough to rebuild the model anywhere (workers, ranks, resumed runs)."""

    name: str = "resnet18"
    num_classes: int = 0
    pretrained: bool = False
    checkpoint: str | None = None


def file_sha256(path: str) -> str:
    _check_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def checkpoint_hash(path: str, cache: str) -> tuple[str, dict]:
    """``file_sha256`` of a checkpoint, taken from the JSON file ``cache`` when it names this very
    file — same real path, size, mtime_ns, inode and device, as make or rsync judge a file — else
    computed (0.03 s for resnet18's 45 MB, about 1 s a GB). Returns (hash, the entry to cache). The
    caller keeps the cache inside OUT and writes it; one that does not parse is ignored."""
    import json
    import re

    _check_file(path)
    st = os.stat(path)
    ident = {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino, "device": st.st_dev}
    try:
        with open(cache, "rb") as f:
            cached = json.loads(f.read(1 << 16))
        if isinstance(cached, dict) and {k: cached.get(k) for k in ident} == ident and re.fullmatch(r"[0-9a-f]{16}", str(cached.get("sha256"))):
            return cached["sha256"], cached
    except (OSError, ValueError, RecursionError):
        pass
    h = file_sha256(path)
    return h, {**ident, "sha256": h}


_ST_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4,
              "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ST_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _check_file(path: str) -> None:
    import stat

    try:
        st = os.stat(path)
    except OSError:
        raise ConfigError(f"--checkpoint {path}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"--checkpoint {path}: not a regular file")


def check_safetensors(path: str) -> None:
    """Vet a .safetensors file against its size before anything is allocated from it: the header
    length, the JSON header, and every tensor's dtype, shape and byte range. Raises ConfigError
    naming the file."""
    import json
    import math

    _check_file(path)
    bad = f"--checkpoint {path}: not a valid safetensors file"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConfigError(f"{bad} (truncated: {size} bytes, shorter than the 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > _ST_MAX_HEADER:
            raise ConfigError(f"{bad} (the header claims {n} bytes; the file holds {size - 8} after the length field"
                              f"{'' if n <= _ST_MAX_HEADER else ', and the limit is 100 MB'}: truncated or not safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{bad} (the header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{bad} (the header is not a JSON object)")
    data = size - 8 - n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = t["dtype"], t["shape"], t["data_offsets"]
            ok = (isinstance(dtype, str) and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                  and type(begin) is int and type(end) is int and 0 <= begin <= end <= data
                  and (dtype not in _ST_DTYPES or end - begin == math.prod(shape) * _ST_DTYPES[dtype]))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{bad} (tensor {str(name)[:80]!r}: dtype, shape or byte range do not fit the file's "
                              f"{data} data bytes: truncated or damaged)")


def load_state_dict(path: str) -> dict[str, Any]:
    """Read a checkpoint's tensors without ever executing pickled code."""
    import torch

    _check_file(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        check_safetensors(path)

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises SafetensorError / OSError for bad files
            raise ConfigError(f"--checkpoint {path}: not a valid safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals; RuntimeError for non-checkpoints
        msg = str(e).split("\n", 1)[0]
        raise ConfigError(
            f"--checkpoint {path}: refused — it is not a plain tensor checkpoint loadable with weights_only=True "
            f"(a pickle that builds other objects can run code). Convert it to .safetensors. ({msg})"
        ) from None
    if isinstance(obj, dict):
        for k in ("state_dict", "model", "model_state_dict", "module"):
            if k in obj and isinstance(obj[k], dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConfigError(f"--checkpoint {path}: holds no state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a checkpoint, in file order. A .safetensors file is read from its header
    only (the tensors are loaded once, by create_model); other files are loaded (and vetted) whole."""
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors import safe_open

        check_safetensors(path)
        try:
            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # safetensors raises SafetensorError / OSError for bad files
            raise ConfigError(f"--checkpoint {path}: not a valid safetensors file ({e})") from None
    return {k: tuple(v.shape) for k, v in load_state_dict(path).items()}


def infer_num_classes(shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The classifier's output size, from the last 2-D weight whose name looks like a head."""
    for k in reversed(list(shapes)):
        if k.endswith(("fc.weight", "head.weight", "classifier.weight", "head.fc.weight")) and len(shapes[k]) == 2:
            return int(shapes[k][0])
    return None


def create_model(spec: ModelSpec):
    """The timm model of ``spec``, with its checkpoint's weights. A checkpoint is loaded into a model
    built on the ``meta`` device (no weights are made, initialised and then overwritten: resnet18's
    random init alone is ~0.1 s, a ViT-L's seconds), its tensors taking the parameters' places
    (``load_state_dict(assign=True)``, cast to the model's dtypes); a model with state the checkpoint
    does not hold (non-persistent buffers) is built and loaded the ordinary way."""
    import timm
    import torch

    state = load_state_dict(spec.checkpoint) if spec.checkpoint else None
    meta = state is not None and not spec.pretrained
    try:
        if meta:
            with torch.device("meta"):
                model = timm.create_model(spec.name, pretrained=False, num_classes=spec.num_classes)
        else:
            model = timm.create_model(spec.name, pretrained=spec.pretrained, num_classes=spec.num_classes)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"--model {spec.name}: unknown timm model (see timm.list_models())") from None
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {spec.name} --pretrained: cannot load weights ({e}); without network use --checkpoint") from None
    if state is None:
        return model
    own = model.state_dict()
    if meta:
        state = {k: v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=meta)
    except RuntimeError as e:  # shape mismatches
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise ConfigError(f"--checkpoint {spec.checkpoint} does not fit --model {spec.name}: {first}") from None
    if spec.num_classes == 0:
        unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
    if missing or unexpected:
        raise ConfigError(
            f"--checkpoint {spec.checkpoint} does not fit --model {spec.name}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    if meta and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return _load_plain(spec, state)
    return model


def _load_plain(spec: ModelSpec, state: dict):
    """A model built with its own initialisation, then loaded (copied into) from ``state``."""
    import timm

    model = timm.create_model(spec.name, pretrained=False, num_classes=spec.num_classes)
    model.load_state_dict(state, strict=False)
    return model


def data_config(model) -> dict[str, Any]:
    """The model's eval preprocessing (timm ``resolve_model_data_config``): input size, mean/std,
    and how its eval transform resizes and crops — crop_pct, interpolation, crop_mode."""
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    return {"input_size": int(cfg["input_size"][-1]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
            "crop_pct": float(cfg.get("crop_pct") or 0.875), "interpolation": str(cfg.get("interpolation") or "bilinear"),
            "crop_mode": str(cfg.get("crop_mode") or "center")}


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device auto or cpu)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], not {device!r}")
    return torch.device(device)
