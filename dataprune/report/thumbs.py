"""Thumbnails of the rows a report shows: each image's bytes fetched by its location through the
dataset's own source (byte-exact, only inside the dataset's roots: the source refuses anything else),
decoded, downscaled with PIL and written as a small file under ``OUT/thumbs/``.

A dataset that cannot be opened, or a row whose location is refused or unreadable, gets the shared
placeholder and a counted reason; the rest of the report still builds."""

from __future__ import annotations

import io
import os
from collections import Counter
from typing import Any

import numpy as np

from ..errors import DataPruneError
from ..tables import atomic_write_bytes

THUMB_DIR = "thumbs"
PLACEHOLDER = "assets/missing.png"


def placeholder_png(size: int) -> bytes:
    """A grey square with a cross: what a thumbnail that could not be made shows."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (225, 225, 225))
    d = ImageDraw.Draw(im)
    d.line([(0, 0), (size - 1, size - 1)], fill=(160, 160, 160), width=2)
    d.line([(0, size - 1), (size - 1, 0)], fill=(160, 160, 160), width=2)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _open(meta: dict[str, Any]):
    """The table's dataset as a Source, or (None, why)."""
    from ..sources import source_from_spec

    spec = meta.get("source")
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) or not isinstance(spec.get("format"), str):
        return None, "the table's metadata names no dataset"
    opts = spec.get("options") if isinstance(spec.get("options"), dict) else {}
    try:
        src = source_from_spec({"path": spec["path"], "format": spec["format"], "options": opts})
        if not str(spec["path"]).startswith(("http://", "https://", "s3://", "gs://", "pipe:")) and not os.path.exists(spec["path"]):
            return None, f"the dataset {spec['path']} is not reachable from here"
        return src, None
    except (DataPruneError, OSError, TypeError, ValueError) as e:
        return None, f"the dataset {spec.get('path')} cannot be opened ({e})"


def _encode(arr: np.ndarray, size: int) -> tuple[bytes, str]:
    from PIL import Image

    im = Image.fromarray(arr)
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if im.width * im.height <= 64 * 64:
        im.save(buf, format="PNG", optimize=True)
        return buf.getvalue(), "png"
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), "jpg"


def make_thumbs(out: str, table, idx: np.ndarray, size: int) -> tuple[dict[int, str], dict[str, Any]]:
    """Thumbnails for the rows ``idx`` of ``table`` (a ``load.Table``): row → path relative to
    ``out`` (the placeholder when it could not be made), and what happened (``made``, ``failed``
    by reason, ``note`` when the dataset itself is unreachable)."""
    from ..decode import decode_image
    from ..sources.base import pick_image

    idx = np.unique(np.asarray(idx, np.int64))
    result: dict[int, str] = {int(i): PLACEHOLDER for i in idx}
    stats: dict[str, Any] = {"wanted": len(idx), "made": 0, "failed": Counter(), "note": None}
    if not len(idx):
        return result, stats
    src, why = _open(table.meta)
    if src is None:
        stats["note"] = why
        stats["failed"]["dataset_unreachable"] = len(idx)
        return result, stats
    os.makedirs(os.path.join(out, THUMB_DIR), exist_ok=True)
    rows = table.rows(idx)
    by_file: dict[str, list[tuple[int, dict]]] = {}
    for i, r in zip(idx.tolist(), rows):
        lp = r.get("loc_path")
        if not isinstance(lp, str) or not isinstance(r.get("loc_offset"), int) or not isinstance(r.get("loc_size"), int):
            stats["failed"]["no_location"] += 1
            continue
        by_file.setdefault(lp, []).append((i, r))
    try:
        for lp, items in by_file.items():
            items.sort(key=lambda ir: ir[1]["loc_offset"])
            for i, r in items:  # one row per fetch: a refused or stale location loses only its own row
                try:
                    if not getattr(src, "checks_locations", False):
                        src.check_location(lp, r.get("key"))
                    fetched = next(iter(src.fetch(lp, [(r.get("key"), r["loc_offset"], r["loc_size"])])), None)
                    if fetched is None:
                        raise ValueError("nothing at that location")
                    _, data = pick_image(fetched.members)
                    if data is None:
                        stats["failed"]["no_image_member"] += 1
                        continue
                    png, ext = _encode(decode_image(data, min_side=size), size)
                except DataPruneError as e:
                    stats["failed"][getattr(e, "reason", None) or type(e).__name__] += 1
                    continue
                except (OSError, ValueError, StopIteration) as e:
                    stats["failed"][type(e).__name__] += 1
                    continue
                sid = int(table.ids[i])
                name = f"{THUMB_DIR}/{sid:016x}.{ext}"
                atomic_write_bytes(os.path.join(out, name), png)
                result[i] = name
                stats["made"] += 1
    finally:
        src.close()
    stats["failed"] = dict(stats["failed"])
    return result, stats
