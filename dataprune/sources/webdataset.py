"""WebDataset tar shards: a directory, one tar, a brace pattern, a shard-list file, .tar.gz, URLs.

With the ``text_column`` option (``--text-column``; text metrics set it) a sample without an image
is a text document: its ``.txt`` member (UTF-8), else the ``text_column`` field of its ``.json``
member (``sources.text.text_of``); that member's bytes are the sample's bytes."""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from typing import BinaryIO, Iterable, Iterator

from .. import tario
from ..errors import ConfigError, SourceError
from ..ids import sample_id
from .base import Fetched, Sample, Shard, Source, common_root, is_url, pick_image, relative_name, split_key
from .documents import text_of
from .guard import Refused, check_label, check_row, escape_name, open_regular, read_classes, shown, unsafe_name, valid_utf8

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_INLINE = 64 << 20  # fetch reads a sample's byte range in one go up to this size (larger: streamed)


def is_tar_name(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def expand_shards(path: str, check: bool = True) -> list[str]:
    """Turn the user's argument into a list of shard paths or URLs (``check=False``: without
    requiring that a list file's entries exist)."""
    if path.startswith("pipe:"):
        raise ConfigError(f"{path}: 'pipe:' URLs run shell commands and are refused; download the shards or use an fsspec URL")
    if "{" in path and ".." in path:
        from braceexpand import braceexpand

        return list(braceexpand(path))
    if is_url(path):
        return [path]
    if os.path.isdir(path):
        found = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_tar_name(f))
        return found
    if os.path.isfile(path) and not is_tar_name(path) and not _looks_like_tar(path):  # a text file listing shards
        base = os.path.dirname(os.path.abspath(path))
        try:
            with io.TextIOWrapper(open_regular(path), encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except UnicodeDecodeError:
            raise SourceError(f"{path}: neither a tar archive nor a text file listing shards", reason="not_tar",
                              path=path) from None
        except Refused as e:
            raise SourceError(f"{shown(path)}: {e.detail}", reason=e.reason, path=path) from None
        except OSError as e:
            raise SourceError(f"{path}: cannot read ({e.strerror or e})", reason="unreadable", path=path) from None
        out = []
        for n, ln in enumerate(lines, 1):
            if ln.startswith("pipe:"):
                raise ConfigError(f"{path}: lists a 'pipe:' URL ({ln}); these run shell commands and are refused")
            full = ln if is_url(ln) or os.path.isabs(ln) else os.path.join(base, ln)
            if check and not is_url(full) and not os.path.exists(full[len("file://"):] if full.startswith("file://") else full):
                raise SourceError(f"{path}: listed shard {ln!r} (entry {n}) does not exist", reason="missing_file", path=path)
            out.append(full)
        return out
    return [path]


def _looks_like_tar(path: str) -> bool:
    """A tar archive without a tar suffix: its first block is a header with a valid checksum."""
    try:
        with open_regular(path, buffering=0) as f:
            block = f.read(tario.BLOCK)
    except (OSError, Refused):
        return False
    return len(block) == tario.BLOCK and block != bytes(tario.BLOCK) and tario._checksum_ok(block)


def open_stream(path: str) -> BinaryIO:
    """Open a shard for reading (gzip-decompressed when needed; URLs through fsspec)."""
    try:
        if is_url(path):
            try:
                import fsspec
            except ImportError:
                raise ConfigError(f"{path}: reading URLs needs fsspec: pip install 'dataprune[remote]'") from None
            raw = fsspec.open(path, "rb").open()
        else:
            local = path[len("file://") :] if path.startswith("file://") else path
            raw = open_regular(local)  # a FIFO or a device named like a shard is never opened
    except Refused as e:
        if e.reason == "missing_file":
            raise SourceError(f"{path}: no such file", reason="missing_file", path=path) from None
        raise SourceError(f"{shown(path)}: {e.detail}", reason=e.reason, path=path) from None
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file", reason="missing_file", path=path) from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot open ({e})", reason="unreadable", path=path) from None
    if path.lower().endswith((".gz", ".tgz")):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def parse_label(members: dict[str, bytes]) -> int | None:
    """Label from ``.cls`` / ``.cls2`` (an integer) or ``.json`` (its ``label`` field): a 32-bit
    integer (:func:`.guard.check_label`). Raises ValueError."""
    for ext in ("cls", "cls2"):
        if ext in members:
            return check_label(members[ext].decode("utf-8"))
    if "json" in members:
        try:
            doc = json.loads(members["json"])
        except RecursionError:
            raise ValueError("the .json member is nested too deeply") from None
        if isinstance(doc, dict) and "label" in doc:
            return check_label(doc["label"])
    return None


class WebDatasetSource(Source):
    format = "wds"
    checks_locations = True

    def __init__(self, path: str, **options):
        super().__init__(path, **options)
        self._classes_from_file()

    def _classes_from_file(self) -> None:
        if is_url(self.path):
            return
        base = self.path if os.path.isdir(self.path) else os.path.dirname(os.path.abspath(self.path))
        found = read_classes(os.path.join(base, "classes.txt"))
        if found is not None:
            self.classes = found

    def location_roots(self) -> list[tuple[str, bool]]:
        """A directory: anything below it (a shard symlinked from elsewhere is outside). A tar, a
        brace pattern or a list file: exactly the shards it names."""
        local = self.path[len("file://"):] if self.path.startswith("file://") else self.path
        if not is_url(local) and os.path.isdir(local):
            return [(os.path.abspath(local), True)]
        try:
            paths = expand_shards(self.path, check=False)
        except (SourceError, ConfigError):
            return []
        return [(p if is_url(p) else os.path.abspath(p[len("file://"):] if p.startswith("file://") else p), False) for p in paths]

    def contains(self, path: str) -> bool:
        """One of the dataset's shards: below its directory and named like a tar, or one it lists."""
        if not super().contains(path):
            return False
        local = self.path[len("file://"):] if self.path.startswith("file://") else self.path
        return is_url(local) or not os.path.isdir(local) or is_tar_name(path)

    def _check_shard(self, shard: Shard) -> None:
        """A shard found by walking a directory must lie inside it; its path must be valid UTF-8."""
        if not valid_utf8(shard.path):
            raise SourceError(f"{shown(shard.path)}: the file name is not valid UTF-8; rename it", reason="unsafe_name",
                              path=escape_name(shard.path))
        if not is_url(shard.path) and os.path.isdir(self.path) and os.path.isfile(shard.path) and not self.contains(shard.path):
            raise SourceError(f"{shard.path}: a symbolic link out of the dataset directory ({shown(os.path.realpath(shard.path))}); "
                              "not read — list such shards in a shard-list file instead", reason="outside_root", path=shard.path)

    def list_shards(self) -> list[Shard]:
        paths = expand_shards(self.path)
        if not paths:
            raise SourceError(f"{self.path}: no .tar shards found", reason="no_shards", path=self.path)
        paths = [p if is_url(p) else os.path.abspath(p[len("file://"):] if p.startswith("file://") else p) for p in paths]
        root = common_root(paths)
        if self.classes is None and root and not is_url(root):  # a list file elsewhere: classes.txt beside the shards
            self.classes = read_classes(os.path.join(root, "classes.txt"))
        shards = []
        for i, p in enumerate(paths):
            size = None
            if not is_url(p):
                if not os.path.exists(p):
                    raise SourceError(f"{p}: no such file", reason="missing_file", path=p)
                size = os.path.getsize(p)
            shards.append(Shard(index=i, name=escape_name(relative_name(p, root)), path=p, size=size))
        return shards

    def iter_samples(self, shard: Shard) -> Iterator[Sample]:
        seen: set[str] = set()
        group: list[tuple[tario.Member, bytes | None, str]] = []
        key: str | None = None
        self._check_shard(shard)
        with open_stream(shard.path) as f:
            try:
                for member, data in tario.iter_members(f, shard.path):
                    k, ext = split_key(member.name)
                    if k != key and group:
                        yield self._make_sample(shard, key, group, seen)
                        group = []
                    key = k
                    group.append((member, data, ext))
                if isinstance(f, gzip.GzipFile):  # gzip checks its CRC and length only at the end of the stream
                    while f.read(1 << 20):
                        pass
            except (SourceError, OSError, EOFError, ValueError, zlib.error) as e:  # damage; gzip/network errors
                if not isinstance(e, SourceError):
                    after = f" after key {key!r}" if key is not None else " at the start"
                    reason = "truncated_tar" if isinstance(e, EOFError) else "unreadable_shard"
                    e = SourceError(f"{shard.path}: read failed{after}: {e}", reason=reason, path=shard.path)
                cut = getattr(e, "member", None)  # the member the archive ends in, when known
                cut_key = split_key(cut)[0] if cut is not None else None
                if group:
                    s = self._make_sample(shard, key, group, seen)
                    if cut_key is None or cut_key == key:
                        # the sample the damage went through: counted as a skip, not silently lost
                        s.status, s.error, s.image, s.members = e.reason, str(e), None, {}
                    yield s  # (complete when the damage is inside the next sample's first member)
                if cut_key is not None and cut_key != key:
                    cut_key = escape_name(cut_key)
                    yield Sample(shard=shard.name, key=cut_key, sample_id=sample_id(shard.name, cut_key), label=None,
                                 image=None, image_ext=None, loc_path=shard.path, loc_offset=0, loc_size=0,
                                 status=e.reason, error=str(e))
                raise e from None
            if group:
                yield self._make_sample(shard, key, group, seen)

    def _make_sample(self, shard: Shard, key: str, group, seen: set[str]) -> Sample:
        first, last = group[0][0], group[-1][0]
        raw_key, key = key, escape_name(key)
        s = Sample(
            shard=shard.name,
            key=key,
            sample_id=sample_id(shard.name, key),
            label=None,
            image=None,
            image_ext=None,
            loc_path=shard.path,
            loc_offset=first.offset,
            loc_size=last.end - first.offset,
        )
        where = f"{shard.path}: member {{!r}}"
        members: dict[str, bytes] = {}
        for m, data, ext in group:
            if not valid_utf8(m.name):
                s.status, s.error = "unsafe_name", f"{shard.path}: member {escape_name(m.name)!r} has a name that is not valid UTF-8"
                return s
            if unsafe_name(m.name):
                s.status, s.error = "unsafe_name", where.format(m.name) + " has an unsafe name (absolute or '..')"
                return s
            if m.kind == "oversized":
                s.status, s.error = "too_large", where.format(m.name) + f" is {m.size} bytes, above the limit of {tario.MAX_MEMBER}"
                return s
            if not m.is_file:
                s.status, s.error = "not_regular_file", where.format(m.name) + f" is a {m.kind}, not a regular file"
                return s
            if ext in members:
                s.status, s.error = "duplicate_key", where.format(m.name) + " appears twice in the shard"
                return s
            members[ext] = data  # type: ignore[assignment]
        if raw_key in seen:
            s.status, s.error = "duplicate_key", f"{shard.path}: key {key!r} appears twice in the shard (non-adjacent members)"
            return s
        seen.add(raw_key)
        s.image_ext, s.image = pick_image(members)
        s.members = members
        if s.image is None and self.options.get("text_column"):
            s.text, why, msg = text_of(s, self.options["text_column"])
            if s.text is None:
                s.status, s.error = why, msg
            else:
                s.image_ext = "txt" if "txt" in members else "json"
                s.image = members[s.image_ext]
            return s
        if s.image is None:
            s.status = "no_image"
            s.error = f"{shard.path}: sample {key!r} has no image member (has: {', '.join(sorted(members)) or 'nothing'})"
            return s
        try:
            s.label = parse_label(members)
        except (ValueError, UnicodeDecodeError) as e:
            s.status, s.error = "bad_label", f"{shard.path}: sample {key!r} has an unreadable label: {e}"
            s.image, s.members = None, {}
        return s

    def fetch(self, loc_path: str, rows: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        """Each row's byte range is untrusted: it must lie in a shard of this dataset, be whole tar
        blocks inside the file, and hold exactly the members of the row's key (headers parsed,
        names checked). A bad row raises SourceError naming it (``bad_location``,
        ``stale_location``, ...) — after the rows before it; nothing is allocated beyond what the
        file holds."""
        self.check_location(loc_path)
        seekable = not is_url(loc_path) and not loc_path.lower().endswith((".gz", ".tgz"))
        with open_stream(loc_path) as f:
            file_size = os.fstat(f.fileno()).st_size if seekable else None
            pos = 0
            shown_path = shown(loc_path)
            for key, offset, size in rows:
                check_row(loc_path, key, offset, size)
                where = f"{shown_path}: sample {key!r} at byte {offset}"
                if size == 0 or offset % tario.BLOCK or size % tario.BLOCK:
                    raise SourceError(f"{where}: loc_offset {offset} / loc_size {size} are not whole, non-empty tar blocks",
                                      reason="bad_location", path=loc_path)
                if file_size is not None:
                    if size > file_size:
                        raise SourceError(f"{where}: loc_size {size} is larger than the whole file ({file_size} bytes)",
                                          reason="bad_location", path=loc_path)
                    if offset + size > file_size:
                        raise SourceError(f"{where} is cut short (the file ends at byte {file_size}, the sample at "
                                          f"{offset + size}); the shard changed since it was scored, or the location is wrong",
                                          reason="truncated_tar", path=loc_path)
                    f.seek(offset)
                elif offset < pos:
                    raise SourceError(f"{loc_path}: rows must be sorted by offset", reason="internal")
                try:
                    if not seekable and tario._skip(f, offset - pos) < offset - pos:
                        raise EOFError("the shard ends before that byte")
                    if file_size is not None and size <= _INLINE:  # inside the file (checked): one read
                        src = io.BytesIO(tario._read_exact(f, size))
                    else:  # streamed: the members' own sizes bound what is read
                        src = _Limited(f, size)
                    members = _region(src, loc_path, key, offset, size, where)
                except (EOFError, OSError, zlib.error) as e:  # a compressed or remote stream that ends or fails
                    raise SourceError(f"{where}: read failed ({e}); the shard changed since it was scored",
                                      reason="truncated_tar" if isinstance(e, EOFError) else "unreadable_shard",
                                      path=loc_path) from None
                pos = offset + size
                yield Fetched(key, members)


def _region(src, path: str, key: str, offset: int, size: int, where: str) -> dict[str, bytes]:
    """The members of ``key`` that exactly fill the ``size`` bytes of ``src`` (a sample's byte
    range, starting at ``offset`` of the shard)."""
    members: dict[str, bytes] = {}
    try:
        for m, data in tario.iter_members(src, path, start=offset, require_eof=False):
            k, ext = split_key(m.name)
            if k != key:
                raise SourceError(f"{where}: member {escape_name(m.name)!r} (byte {m.offset}) does not belong to that key; "
                                  "the shard changed since it was scored, or the location is wrong", reason="stale_location",
                                  path=path)
            if unsafe_name(m.name):
                raise SourceError(f"{where}: member {m.name!r} has an unsafe name", reason="unsafe_name", path=path)
            if not m.is_file or data is None:
                raise SourceError(f"{where}: member {m.name!r} is a {m.kind}, not a regular file", reason="not_regular_file",
                                  path=path)
            if ext in members:
                raise SourceError(f"{where}: member {m.name!r} appears twice", reason="duplicate_key", path=path)
            members[ext] = data
    except SourceError as e:
        if e.reason in ("stale_location", "unsafe_name", "not_regular_file", "duplicate_key", "internal") or (
                e.reason == "not_tar" and offset == 0):
            raise
        raise SourceError(f"{where}: {e}", reason="stale_location" if e.reason == "corrupt_tar" else e.reason,
                          path=path) from None
    if not members:
        raise SourceError(f"{path}: no member of key {key!r} at byte {offset}; the shard changed since it was scored",
                          reason="stale_location", path=path)
    left = size - src.tell()
    if left:
        raise SourceError(f"{where}: the members of the key end {left} bytes before loc_size {size} does; the shard "
                          "changed since it was scored, or the location is wrong", reason="stale_location", path=path)
    return members


class _Limited:
    """At most ``left`` bytes of ``f``: a row's member headers cannot make a read run past its range."""

    def __init__(self, f: BinaryIO, left: int):
        self.f, self.left, self.size = f, left, left

    def tell(self) -> int:
        return self.size - self.left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        if n <= 0:
            return b""
        data = self.f.read(n)
        self.left -= len(data)
        return data
