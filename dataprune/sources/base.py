"""Source contract: list shards, stream samples of one shard, fetch samples back by location."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
LABEL_EXTS = ("cls", "cls2", "json")


@dataclass(frozen=True)
class Shard:
    """One unit of work. Small and picklable: workers rebuild everything else from it."""

    index: int  # position in the source's shard list
    name: str  # stable name: relative path of the file, or a virtual name for folder shards
    path: str  # file path or URL (for folder shards: the dataset root)
    size: int | None = None  # bytes on disk when known
    files: tuple[str, ...] = ()  # folder shards: relative paths of the files in this shard


@dataclass
class Sample:
    shard: str
    key: str
    sample_id: int
    label: int | None
    image: bytes | None
    image_ext: str | None
    loc_path: str
    loc_offset: int
    loc_size: int
    members: dict[str, bytes] = field(default_factory=dict)  # every member by extension (export)
    status: str = "ok"  # "ok" or the reason it was skipped
    error: str | None = None  # human-readable message naming file and member

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Fetched:
    """A sample read back by location for export."""

    key: str
    members: dict[str, bytes]


class Source(ABC):
    """A dataset on disk. Subclasses implement three methods; see docs/architecture.md."""

    format: str = ""

    def __init__(self, path: str, **options: Any):
        self.path = path
        self.options = options
        self.classes: list[str] | None = None

    @abstractmethod
    def list_shards(self) -> list[Shard]:
        """Every shard, in a stable order."""

    @abstractmethod
    def iter_samples(self, shard: Shard) -> Iterator[Sample]:
        """Stream the samples of one shard. Per-sample problems come back as samples with a
        non-"ok" status; problems with the shard itself raise SourceError (after the samples that
        could be read)."""

    @abstractmethod
    def fetch(self, loc_path: str, rows: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        """Read samples back from ``loc_path`` given ``(key, loc_offset, loc_size)`` rows sorted by
        offset, yielding them in that order. Copies original bytes: no decode, no re-encode."""

    def spec(self) -> dict[str, Any]:
        """What is needed to reopen this source later (stored in table metadata)."""
        path = self.path
        if not (is_url(path) or path.startswith(("file://", "pipe:"))):
            path = os.path.abspath(path)  # a manifest used from another directory still finds its data
        return {"format": self.format, "path": path, "options": dict(self.options)}

    def close(self) -> None:
        """Release cached file handles (optional)."""


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: key = path up to the first dot of the basename, ext = the rest, lower-cased."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def unsafe_name(name: str) -> bool:
    """Absolute paths, ``..`` components, backslashes and NULs are never allowed in keys."""
    if not name or name[0] == "/" or "\\" in name or "\x00" in name or name[1:2] == ":":  # ... or C:foo
        return True
    return ".." in name and any(part == ".." for part in name.split("/"))  # split only when it could matter


def sniff_ext(data: bytes) -> str | None:
    """Image type from magic bytes, as a file extension."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def pick_image(members: dict[str, bytes]) -> tuple[str | None, bytes | None]:
    """The sample's image member: the first extension in IMAGE_EXTS order, then any ``*.jpg`` etc."""
    for ext in IMAGE_EXTS:
        if ext in members:
            return ext, members[ext]
    for ext, data in members.items():
        if ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
            return ext, data
    return None, None


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def common_root(paths: list[str]) -> str:
    if not paths:
        return ""
    if any(is_url(p) for p in paths):
        prefix = os.path.commonprefix(paths)
        return prefix[: prefix.rfind("/") + 1]
    dirs = [os.path.dirname(os.path.abspath(p)) for p in paths]
    return os.path.commonpath(dirs)


def relative_name(path: str, root: str) -> str:
    if is_url(path):
        return path[len(root) :] if root and path.startswith(root) else path.rsplit("/", 1)[-1]
    return os.path.relpath(os.path.abspath(path), root).replace(os.sep, "/")
