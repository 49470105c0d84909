"""WebDataset tar shards: a directory, one tar, a brace pattern, a shard-list file, .tar.gz, URLs."""

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
from .base import Fetched, Sample, Shard, Source, common_root, is_url, pick_image, relative_name, split_key, unsafe_name

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_tar_name(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def expand_shards(path: str) -> list[str]:
    """Turn the user's argument into a list of shard paths or URLs."""
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
            with open(path, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        except UnicodeDecodeError:
            raise SourceError(f"{path}: neither a tar archive nor a text file listing shards", reason="not_tar",
                              path=path) from None
        except OSError as e:
            raise SourceError(f"{path}: cannot read ({e.strerror or e})", reason="unreadable", path=path) from None
        out = []
        for n, ln in enumerate(lines, 1):
            if ln.startswith("pipe:"):
                raise ConfigError(f"{path}: lists a 'pipe:' URL ({ln}); these run shell commands and are refused")
            full = ln if is_url(ln) or os.path.isabs(ln) else os.path.join(base, ln)
            if not is_url(full) and not os.path.exists(full[len("file://"):] if full.startswith("file://") else full):
                raise SourceError(f"{path}: listed shard {ln!r} (entry {n}) does not exist", reason="missing_file", path=path)
            out.append(full)
        return out
    return [path]


def _looks_like_tar(path: str) -> bool:
    """A tar archive without a tar suffix: its first block is a header with a valid checksum."""
    try:
        with open(path, "rb") as f:
            block = f.read(tario.BLOCK)
    except OSError:
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
            raw = open(local, "rb", buffering=1 << 20)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file", reason="missing_file", path=path) from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: cannot open ({e})", reason="unreadable", path=path) from None
    if path.lower().endswith((".gz", ".tgz")):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def parse_label(members: dict[str, bytes]) -> int | None:
    """Label from ``.cls`` / ``.cls2`` (an integer) or ``.json`` (its ``label`` field). Raises ValueError."""
    for ext in ("cls", "cls2"):
        if ext in members:
            return int(members[ext].decode("utf-8").strip())
    if "json" in members:
        doc = json.loads(members["json"])
        if isinstance(doc, dict) and "label" in doc:
            value = doc["label"]
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"label field is {type(value).__name__}, not an integer")
            return int(value)
    return None


class WebDatasetSource(Source):
    format = "wds"

    def __init__(self, path: str, **options):
        super().__init__(path, **options)
        self._classes_from_file()

    def _classes_from_file(self) -> None:
        if is_url(self.path):
            return
        base = self.path if os.path.isdir(self.path) else os.path.dirname(os.path.abspath(self.path))
        f = os.path.join(base, "classes.txt")
        if os.path.isfile(f):
            with open(f, encoding="utf-8") as fh:
                self.classes = [ln.strip() for ln in fh if ln.strip()]

    def list_shards(self) -> list[Shard]:
        paths = expand_shards(self.path)
        if not paths:
            raise SourceError(f"{self.path}: no .tar shards found", reason="no_shards", path=self.path)
        paths = [p if is_url(p) else os.path.abspath(p[len("file://"):] if p.startswith("file://") else p) for p in paths]
        root = common_root(paths)
        if self.classes is None and root and not is_url(root):  # a list file elsewhere: classes.txt beside the shards
            f = os.path.join(root, "classes.txt")
            if os.path.isfile(f):
                with open(f, encoding="utf-8") as fh:
                    self.classes = [ln.strip() for ln in fh if ln.strip()]
        shards = []
        for i, p in enumerate(paths):
            size = None
            if not is_url(p):
                if not os.path.exists(p):
                    raise SourceError(f"{p}: no such file", reason="missing_file", path=p)
                size = os.path.getsize(p)
            shards.append(Shard(index=i, name=relative_name(p, root), path=p, size=size))
        return shards

    def iter_samples(self, shard: Shard) -> Iterator[Sample]:
        seen: set[str] = set()
        group: list[tuple[tario.Member, bytes | None, str]] = []
        key: str | None = None
        with open_stream(shard.path) as f:
            try:
                for member, data in tario.iter_members(f, shard.path):
                    k, ext = split_key(member.name)
                    if k != key and group:
                        yield self._make_sample(shard, key, group, seen)
                        group = []
                    key = k
                    group.append((member, data, ext))
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
                    yield Sample(shard=shard.name, key=cut_key, sample_id=sample_id(shard.name, cut_key), label=None,
                                 image=None, image_ext=None, loc_path=shard.path, loc_offset=0, loc_size=0,
                                 status=e.reason, error=str(e))
                raise e from None
            if group:
                yield self._make_sample(shard, key, group, seen)

    def _make_sample(self, shard: Shard, key: str, group, seen: set[str]) -> Sample:
        first, last = group[0][0], group[-1][0]
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
            if unsafe_name(m.name):
                s.status, s.error = "unsafe_name", where.format(m.name) + " has an unsafe name (absolute or '..')"
                return s
            if not m.is_file:
                s.status, s.error = "not_regular_file", where.format(m.name) + f" is a {m.kind}, not a regular file"
                return s
            if ext in members:
                s.status, s.error = "duplicate_key", where.format(m.name) + " appears twice in the shard"
                return s
            members[ext] = data  # type: ignore[assignment]
        if key in seen:
            s.status, s.error = "duplicate_key", f"{shard.path}: key {key!r} appears twice in the shard (non-adjacent members)"
            return s
        seen.add(key)
        s.image_ext, s.image = pick_image(members)
        s.members = members
        if s.image is None:
            s.status = "no_image"
            s.error = f"{shard.path}: sample {key!r} has no image member (has: {', '.join(sorted(members)) or 'nothing'})"
            return s
        try:
            s.label = parse_label(members)
        except (ValueError, UnicodeDecodeError) as e:
            s.status, s.error = "bad_label", f"{shard.path}: sample {key!r} has an unreadable label: {e}"
        return s

    def fetch(self, loc_path: str, rows: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        seekable = not is_url(loc_path) and not loc_path.lower().endswith((".gz", ".tgz"))
        with open_stream(loc_path) as f:
            pos = 0
            for key, offset, size in rows:
                if unsafe_name(key):  # a hand-edited manifest: never copy such names into new shards
                    raise SourceError(f"{loc_path}: unsafe key {key!r} in the manifest", reason="unsafe_name", path=loc_path)
                if seekable:
                    f.seek(offset)
                elif offset >= pos:
                    tario._skip(f, offset - pos)
                else:
                    raise SourceError(f"{loc_path}: rows must be sorted by offset", reason="internal")
                region = tario._read_exact(f, size)
                pos = offset + len(region)
                if len(region) < size:
                    raise SourceError(
                        f"{loc_path}: sample {key!r} at byte {offset} is cut short ({len(region)} of {size} bytes); the shard changed since it was scored",
                        reason="truncated_tar",
                        path=loc_path,
                    )
                members: dict[str, bytes] = {}
                for m, data in tario.iter_members(io.BytesIO(region), loc_path, start=offset, require_eof=False):
                    k, ext = split_key(m.name)
                    if k == key and m.is_file and data is not None:
                        members[ext] = data
                if not members:
                    raise SourceError(
                        f"{loc_path}: no member of key {key!r} at byte {offset}; the shard changed since it was scored",
                        reason="stale_location",
                        path=loc_path,
                    )
                yield Fetched(key, members)
