"""Source contract: list shards, stream samples of one shard, fetch samples back by location."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from ..errors import ConfigError, SourceError
from .guard import escape_name, is_inside, real_path, shown, unsafe_name, valid_utf8  # noqa: F401  (unsafe_name: re-exported)

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
    problems: tuple[tuple[str, str, str], ...] = ()  # folder shards: (relative path, reason, message) found while listing


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
    text: str | None = None  # text sources: the document (``image`` then holds the sample's bytes as stored)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Fetched:
    """A sample read back by location for export."""

    key: str
    members: dict[str, bytes]
    path: str | None = None  # the real path of the file read, when a sample is one whole file (hard links)


class Source(ABC):
    """A dataset on disk. Subclasses implement three methods; see docs/architecture.md.

    Locations (``fetch``) come from manifests other people made: :meth:`contains` says whether a
    path lies inside the dataset (its :meth:`location_roots`, compared as real paths). The built-in
    sources refuse anything else in ``fetch`` themselves (``checks_locations``); for the others
    the export driver checks before it calls ``fetch``."""

    format: str = ""
    checks_locations = False  # True when fetch() itself refuses locations outside the dataset

    def __init__(self, path: str, **options: Any):
        self.path = path
        self.options = options
        self.classes: list[str] | None = None
        self._roots: tuple[list[tuple[str, bool]], set[str]] | None = None
        self._inside_cache: dict[str, bool] = {}

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

    def location_roots(self) -> list[tuple[str, bool]]:
        """``(path, is_dir)`` of what this dataset's locations may point into: a directory (anything
        below it) or one file (exactly it); URLs too. Default: the source's path, or the directory
        holding it when it is a file."""
        if is_url(self.path):
            return [(self.path, False)]
        local = self.path[len("file://"):] if self.path.startswith("file://") else self.path
        return [(local, True)] if os.path.isdir(local) else [(os.path.dirname(os.path.abspath(local)), True)]

    def contains(self, path: str) -> bool:
        """Does ``path`` (an untrusted location) lie inside this dataset? Real paths are compared:
        a symlink that leads out of the roots is outside; a URL must be one of the source's own."""
        if not isinstance(path, str) or not path or "\x00" in path:
            return False
        cache = self.__dict__.setdefault("_inside_cache", {})  # (a plug-in may not call Source.__init__)
        hit = cache.get(path)
        if hit is None:
            if getattr(self, "_roots", None) is None:
                local, urls = [], set()
                for root, is_dir in self.location_roots():
                    if is_url(root):
                        urls.add(root)
                    else:
                        local.append((real_path(root), is_dir))
                self._roots = (local, urls)
            local, urls = self._roots
            if is_url(path):
                hit = path in urls
            else:
                real = real_path(path)
                hit = any(is_inside(real, r, d) for r, d in local)
            if len(cache) > 1 << 16:
                cache.clear()
            cache[path] = hit
        return hit

    def check_location(self, path: str, key: str | None = None) -> None:
        """Raise SourceError (reason ``outside_root``) unless :meth:`contains` ``path``."""
        if not self.contains(path):
            what = f" (sample {key!r})" if key is not None else ""
            roots = ", ".join(shown(r) for r, _ in self.location_roots()[:3])
            raise SourceError(f"{shown(path)}{what}: outside the dataset ({roots}); refused — a manifest may only point "
                              "into the dataset it records", reason="outside_root", path=path if isinstance(path, str) else None)

    def input_dirs(self, loc_paths) -> set[str]:
        """Local directories holding the dataset's files (``--out`` must not be inside them)."""
        return {os.path.dirname(real_path(p)) for p in loc_paths if isinstance(p, str) and not is_url(p) and self.contains(p)}

    def refuse_output_inside(self, out: str, loc_paths) -> None:
        """ConfigError when ``out`` is, or is inside, a directory of this dataset (nothing is written
        into the input) — the one check ``score`` and ``export`` share."""
        real = os.path.realpath(out)
        for d in filter(None, self.input_dirs(loc_paths)):
            d = os.path.realpath(d)
            if is_inside(real, d):
                raise ConfigError(f"--out {out} is inside the input data ({d}); choose a directory outside it")

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


def file_shards(files: list[str], what: str, path: str) -> list[Shard]:
    """One shard per file of a listing (``what``: the kinds it looked for, for the error when there
    are none), named by its path below the files' common root."""
    if not files:
        raise SourceError(f"{path}: no {what} files found", reason="no_shards", path=path)
    root = common_root(files)
    shards = []
    for i, p in enumerate(files):
        if not os.path.exists(p):
            raise SourceError(f"{p}: no such file", reason="missing_file", path=p)
        shards.append(Shard(index=i, name=escape_name(relative_name(p, root)), path=p, size=os.path.getsize(p)))
    return shards


class FileTreeSource(Source):
    """A source whose shards are the files below ``path`` (or ``path`` itself) that
    :meth:`is_shard_name` accepts: the listing, the location checks and the per-file name checks
    parquet and JSON-lines corpora share."""

    @staticmethod
    @abstractmethod
    def is_shard_name(name: str) -> bool:
        """Is a file of this name (below a dataset directory) a shard?"""

    def _files(self) -> list[str]:
        if os.path.isdir(self.path):
            out = []
            for dirpath, dirnames, filenames in os.walk(self.path):
                dirnames.sort()
                out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if self.is_shard_name(f))
            return [os.path.abspath(p) for p in out]
        return [os.path.abspath(self.path)]  # locations must not depend on the working directory

    def location_roots(self) -> list[tuple[str, bool]]:
        return [(os.path.abspath(self.path), os.path.isdir(self.path))]

    def contains(self, path: str) -> bool:
        """The file, or a shard-named file below the directory (nothing else is a shard)."""
        return super().contains(path) and (not os.path.isdir(self.path) or self.is_shard_name(path))

    def _check_shard(self, path: str) -> None:
        """A shard's name must be UTF-8, and a link below the directory must not lead out of it."""
        if not valid_utf8(path):
            raise SourceError(f"{shown(path)}: the file name is not valid UTF-8; rename it", reason="unsafe_name",
                              path=escape_name(path))
        if os.path.isdir(self.path) and os.path.isfile(path) and not self.contains(path):  # (special files: the caller's open)
            raise SourceError(f"{path}: a symbolic link out of the dataset directory ({shown(os.path.realpath(path))}); "
                              "not read", reason="outside_root", path=path)
