"""Source registry. A new input format is one module with a Source subclass plus one ``register`` line."""

from __future__ import annotations

import os
from typing import Any

from ..errors import SourceError
from ..registry import Registry
from .base import IMAGE_EXTS, Fetched, Sample, Shard, Source, is_url
from .folder import FolderSource
from .guard import kind_of, shown
from .parquet import ParquetSource
from .documents import text_of
from .text import JsonlSource, is_text_name
from .webdataset import WebDatasetSource, is_tar_name

SOURCES: Registry[type[Source]] = Registry("format", lambda name, names: f"unknown format {name!r}; choose one of: {', '.join(sorted(names))}")


def register(cls: type[Source]) -> type[Source]:
    return SOURCES.add(cls.format, cls)


def unregister(format: str) -> None:
    SOURCES.remove(format)


for _cls in (WebDatasetSource, FolderSource, ParquetSource, JsonlSource):
    register(_cls)


def list_formats() -> list[str]:
    return sorted(SOURCES)


def detect_format(path: str) -> str:
    """Guess the format from the path: tar/brace/URL/list → wds, .parquet → parquet, .jsonl/.jsonl.gz/.json.gz →
    jsonl, folder of images → folder (a folder: the first of these found, walking it in sorted order)."""
    if path.startswith("pipe:"):
        return "wds"
    low = path.lower()
    if is_tar_name(low) or ("{" in path and ".." in path) or is_url(path):
        return "wds"
    if low.endswith(".parquet"):
        return "parquet"
    if is_text_name(low):
        return "jsonl"
    if os.path.isdir(path):
        has_images = False
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for f in filenames:
                fl = f.lower()
                if is_tar_name(fl):
                    return "wds"
                if fl.endswith(".parquet"):
                    return "parquet"
                if is_text_name(fl):
                    return "jsonl"
                if fl.rsplit(".", 1)[-1] in IMAGE_EXTS:
                    has_images = True
            if has_images:
                return "folder"
        raise SourceError(f"{path}: no .tar shards, .parquet or .jsonl files or images found", reason="no_shards", path=path)
    if os.path.isfile(path):
        return "wds"  # a text file listing shards
    if os.path.exists(path):
        raise SourceError(f"{shown(path)}: a {kind_of(os.stat(path).st_mode)}, not a dataset (a directory, a tar, a list file "
                          "or a parquet file)", reason="not_regular_file", path=path)
    raise SourceError(f"{path}: no such file or directory", reason="missing_file", path=path)


def open_source(path: str, format: str | None = None, **options: Any) -> Source:
    fmt = format or detect_format(path)
    cls = SOURCES.lookup(fmt)
    options = {k: v for k, v in options.items() if v is not None}
    return cls(path, **options)


def source_from_spec(spec: dict[str, Any]) -> Source:
    return open_source(spec["path"], spec["format"], **spec.get("options", {}))


__all__ = [
    "Fetched", "Sample", "Shard", "Source", "SOURCES", "register", "unregister", "list_formats", "detect_format", "open_source",
    "source_from_spec", "text_of",
]
