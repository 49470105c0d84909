"""`dataprune info`: what is in a dataset, and with ``check`` whether every image decodes (a text
sample's document is read by its source: valid UTF-8, valid JSON, the text field present)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from .errors import DecodeError, SourceError
from .sources import open_source


def dataset_info(
    path: str,
    *,
    format: str | None = None,
    source_options: dict[str, Any] | None = None,
    check: bool = False,
    max_pixels: int | None = None,
    progress: Callable[[int], None] | None = None,
    on_shards: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    from .decode import DEFAULT_MAX_PIXELS, decode_image

    source = open_source(path, format, **(source_options or {}))
    shards = source.list_shards()
    if on_shards:
        on_shards(len(shards))
    labels: Counter = Counter()
    problems: Counter = Counter()
    examples: list[str] = []
    shard_errors: list[dict[str, Any]] = []
    seen = ok = image_bytes = documents = unread_documents = 0
    disk_bytes = 0
    shard_rows = []
    t0 = time.perf_counter()

    def problem(reason: str, message: str | None) -> None:
        problems[reason] += 1
        if message and len(examples) < 20:
            examples.append(message)

    for shard in shards:
        n = good = 0
        if shard.size:
            disk_bytes += shard.size
        try:
            for s in source.iter_samples(shard):
                n += 1
                if s.text is not None:  # a document (text sources; a tar's .txt/.json with --text-column)
                    documents += 1
                elif s.ok and check:
                    try:
                        decode_image(s.image, max_pixels or DEFAULT_MAX_PIXELS)
                    except DecodeError as e:
                        s.status, s.error = e.reason, f"{s.loc_path}: sample {s.key!r} ({s.image_ext}): {e}"
                elif s.status == "no_image" and ("txt" in s.members or "json" in s.members):
                    unread_documents += 1  # read as text only when asked (--text-column), as score and export do
                if s.ok:
                    good += 1
                    image_bytes += len(s.image or b"")
                    if s.label is not None:
                        labels[s.label] += 1
                else:
                    problem(s.status, s.error)
                if progress and n % 256 == 0:
                    progress(256)
        except SourceError as e:  # a damaged shard: the samples before the damage are counted above
            shard_errors.append({"shard": shard.name, "reason": e.reason, "error": str(e)})
            shard_rows.append({"shard": shard.name, "samples": n, "ok": good, "skipped": n - good, "error": str(e)})
        else:
            shard_rows.append({"shard": shard.name, "samples": n, "ok": good, "skipped": n - good, "error": None})
        if progress:
            progress(n % 256)
        seen += n
        ok += good
    if source.format == "folder":
        disk_bytes = image_bytes
    classes = source.classes
    unlabelled = ok - sum(labels.values())
    return {
        "path": path,
        "format": source.format,
        "shards": len(shards),
        "samples": seen,
        "ok": ok,
        "skipped": seen - ok,
        "problems": dict(sorted(problems.items())),  # per-sample problems by reason (they add up to "skipped")
        "shard_errors": shard_errors,  # damaged shards (truncated, not a tar, unreadable parquet)
        "problem_examples": examples,
        "checked": check,
        "bytes": disk_bytes,
        "image_bytes": image_bytes,
        "documents": documents,  # samples that are text documents (text sources, .txt/.json members with --text-column)
        "unread_documents": unread_documents,  # skipped as no_image, but holding a .txt/.json member
        "unlabelled": unlabelled,
        "classes": [
            {"label": int(lbl), "name": classes[lbl] if classes and 0 <= lbl < len(classes) else None, "count": int(c)}
            for lbl, c in sorted(labels.items())
        ],
        "per_shard": shard_rows,
        "seconds": round(time.perf_counter() - t0, 3),
    }
