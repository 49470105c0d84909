"""A small, strict tar reader and a deterministic tar writer.

Python's ``tarfile`` silently stops at a corrupt or truncated header after the first member, which
would lose samples without telling anyone. This reader works on any forward-only stream (plain
file, gzip stream, fsspec file), reports the exact byte offsets of every member (so export can copy
a sample's blocks back out by location), and raises :class:`~dataprune.errors.SourceError` with the
file and member for every kind of damage.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

from .errors import SourceError
from .tarwrite import BLOCK, RECORD, end_of_archive, headers_array, member_header, padded, padding  # noqa: F401  (the writer half)

_REGULAR = (b"0", b"\x00", b"7")
_SKIP_QUIETLY = (b"5", b"g")  # directories, global pax headers: not samples
MAX_MEMBER = 1 << 30  # a regular member above this is never read into memory (kind "oversized"; e.g. a gzip bomb)
MAX_EXTENSION = 1 << 20  # pax / GNU long-name headers above this are damage


@dataclass
class Member:
    name: str
    kind: str  # "file", or why it is not one ("symlink", "hardlink", "device", "oversized", "other")
    size: int
    offset: int  # first byte of the member's first header block (extension headers included)
    data_offset: int
    end: int  # first byte after the member's padded data

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.split(b"\x00", 1)[0].strip()
    value = int(text, 8) if text else 0
    if value < 0:  # int() accepts a sign; tar fields never carry one
        raise ValueError(f"negative octal field {text!r}")
    return value


def _cstr(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _octal(header[148:156])
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    if stored == unsigned:
        return True
    signed = sum((b - 256 if b > 127 else b) for b in header[:148] + header[156:]) + 8 * 32
    return stored == signed


def _parse_pax(data: bytes) -> dict[str, str]:
    """Records ``"<length> <key>=<value>\n"``. Raises ValueError on a malformed record (a length that
    does not move forward would otherwise loop for ever)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            break
        sp = data.find(b" ", pos)
        if sp < 0:
            raise ValueError("pax record without a length")
        length = int(data[pos:sp])
        if length <= sp + 1 - pos or pos + length > len(data):
            raise ValueError(f"bad pax record length {length}")
        record = data[sp + 1 : pos + length - 1]
        k, _, v = record.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes (fewer at the end of the stream); nothing for ``n <= 0``."""
    chunks = []
    remaining = max(0, n)
    while remaining:
        chunk = f.read(min(remaining, 1 << 24))  # a corrupt size field must not allocate gigabytes up front
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def _skip(f: BinaryIO, n: int) -> int:
    """Advance ``n`` bytes; returns how many were actually available."""
    if n <= 0:
        return 0
    # Seek only in plain files and memory buffers, where the size is known without reading: a
    # GzipFile claims to be seekable but emulates SEEK_END by decompressing to the end (and seeking
    # back by decompressing again from the start), which made every skip O(file size).
    size = None
    if isinstance(f, io.BytesIO):
        size = f.getbuffer().nbytes
    elif isinstance(f, (io.BufferedReader, io.FileIO)):
        try:
            size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError):
            size = None
    if size is not None:
        here = f.tell()
        f.seek(min(here + n, max(size, here)))
        return max(0, min(n, size - here))
    done = 0
    while done < n:
        chunk = f.read(min(1 << 20, n - done))
        if not chunk:
            break
        done += len(chunk)
    return done


def iter_members(f: BinaryIO, path: str, *, start: int = 0, require_eof: bool = True) -> Iterator[tuple[Member, bytes | None]]:
    """Yield ``(member, data)`` for every member of the tar stream ``f``.

    ``data`` is the member's bytes when it is a regular file, else ``None``. ``start`` is the stream
    position of ``f`` (offsets are reported relative to the whole file). Raises SourceError naming
    ``path`` and the member.

    Plain local files take a fast path (:func:`_iter_plain`) that yields exactly the same members;
    it hands over to the strict reader at the first header it does not fully understand.
    """
    if require_eof and isinstance(f, (io.BufferedReader, io.FileIO)) and f.seekable():
        return _iter_plain(f, path, start)
    return _iter_strict(f, path, start=start, require_eof=require_eof)


_CHUNK = 1 << 22  # the fast path reads 4 MiB at a time: memory stays bounded for any shard size
_ZERO = bytes(BLOCK)


def _scan(buf: bytes, p: int) -> tuple[list[tuple[int, bytes, int, int]], str]:
    """Headers of the plain members (ustar/v7 regular files, no extensions) that lie wholly in
    ``buf`` from ``p`` on: ``[(pos, name field, size, stored checksum)]`` and why the scan stopped:
    ``"more"`` (the buffer ends), ``"end"`` (end-of-archive block) or ``"odd"`` (anything else —
    the strict reader takes over there)."""
    heads = []
    n = len(buf)
    while p + BLOCK <= n:
        h = buf[p : p + BLOCK]
        if h[0] == 0:
            return heads, "end" if h == _ZERO else "odd"
        if h[156] not in (48, 0) or h[124] & 0x80 or (h[257:262] == b"ustar" and h[345]):
            return heads, "odd"  # links, devices, long names, pax, base-256 sizes, ustar prefixes
        try:
            size, stored = _octal(h[124:136]), _octal(h[148:156])
        except ValueError:
            return heads, "odd"
        if size > MAX_MEMBER:
            return heads, "odd"
        end = p + BLOCK + padded(size)
        if end > n:
            return heads, "more"
        heads.append((p, h[:100], size, stored))
        p = end
    return heads, "more"


def _checked(buf: bytes, heads: list) -> int:
    """How many of ``heads`` (from the start) carry a valid unsigned checksum; vectorised."""
    if not heads:
        return 0
    nb = len(buf) // BLOCK  # headers sit on block boundaries of buf: gather whole rows
    pos = np.fromiter((h[0] for h in heads), np.int64, len(heads))
    blocks = np.frombuffer(buf, np.uint8, nb * BLOCK).reshape(nb, BLOCK)[pos // BLOCK]
    total = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 8 * 32
    stored = np.fromiter((h[3] for h in heads), np.int64, len(heads))
    bad = np.flatnonzero(total != stored)
    return int(bad[0]) if len(bad) else len(heads)


def _iter_plain(f: BinaryIO, path: str, start: int) -> Iterator[tuple[Member, bytes | None]]:
    """The fast path for plain files: chunked reads, one cheap pass over each header, checksums
    checked for a whole chunk at once. At anything unusual (extension headers, links, a bad
    checksum or size, a truncated archive) it seeks back and hands over to :func:`_iter_strict`,
    which yields the rest or raises the precise error."""
    buf, off, p = b"", start, 0  # buf[0] is at file offset ``off``; ``p`` is the next header in buf
    file_size = os.fstat(f.fileno()).st_size
    last_name = None
    while True:
        heads, why = _scan(buf, p)
        ok = _checked(buf, heads)
        for q, field, size, _ in heads[:ok]:
            name = _cstr(field)
            end = q + BLOCK + padded(size)
            yield Member(name, "file", size, off + q, off + q + BLOCK, off + end), buf[q + BLOCK : q + BLOCK + size]
            last_name, p = name, end
        if ok < len(heads) or why == "odd":
            break
        if why == "end":
            return
        need = BLOCK
        if len(buf) - p >= BLOCK:  # a header is here but its member's data is not: read at least that much
            h = buf[p : p + BLOCK]
            if not _checksum_ok(h):
                break
            need = BLOCK + padded(_octal(h[124:136]))
            if off + p + need > file_size or need > MAX_MEMBER:
                break  # truncated: the strict reader names the member
        chunk = f.read(max(_CHUNK, need - (len(buf) - p)))
        if not chunk:
            break
        buf, off, p = buf[p:] + chunk, off + p, 0
    f.seek(off + p)
    yield from _iter_strict(f, path, start=off + p, last_name=last_name)


def _iter_strict(
    f: BinaryIO, path: str, *, start: int = 0, require_eof: bool = True, last_name: str | None = None
) -> Iterator[tuple[Member, bytes | None]]:
    pos = start
    ext_start: int | None = None
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(f, BLOCK)
        if len(header) == 0:
            if pos == 0 and start == 0:
                raise SourceError(f"{path}: empty file (0 bytes), not a tar archive", reason="not_tar", path=path)
            if require_eof:
                after = f" after member {last_name!r}" if last_name else ""
                raise SourceError(
                    f"{path}: archive ends at byte {pos} without an end-of-archive marker{after} (truncated?)",
                    reason="truncated_tar",
                    path=path,
                )
            return
        if len(header) < BLOCK:
            if pos == 0 and start == 0:
                raise SourceError(f"{path}: not a tar archive ({len(header)} bytes, shorter than one tar block)",
                                  reason="not_tar", path=path)
            raise SourceError(
                f"{path}: truncated tar header at byte {pos}" + (f" after member {last_name!r}" if last_name else ""),
                reason="truncated_tar",
                path=path,
            )
        if header == b"\x00" * BLOCK:
            return  # end-of-archive marker
        if not _checksum_ok(header):
            if pos == 0:
                raise SourceError(f"{path}: not a tar archive (bad header checksum at byte 0)", reason="not_tar", path=path)
            raise SourceError(
                f"{path}: corrupt tar header at byte {pos}" + (f" after member {last_name!r}" if last_name else ""),
                reason="corrupt_tar",
                path=path,
            )
        header_pos = pos
        pos += BLOCK
        if ext_start is None:
            ext_start = header_pos
        typeflag = header[156:157]
        try:
            size = _octal(header[124:136])
        except ValueError:
            raise SourceError(f"{path}: corrupt size field in tar header at byte {header_pos}", reason="corrupt_tar", path=path)
        name = _cstr(header[0:100])
        if header[257:262] == b"ustar":
            prefix = _cstr(header[345:500])
            if prefix:
                name = prefix + "/" + name
        if typeflag in (b"L", b"x"):  # GNU long name / pax extended header for the next member
            if size > MAX_EXTENSION:
                raise SourceError(f"{path}: corrupt tar header at byte {header_pos}: an extended header of {size} bytes",
                                  reason="corrupt_tar", path=path)
            data = _read_exact(f, padded(size))
            if len(data) < padded(size):
                raise SourceError(f"{path}: truncated extended header at byte {header_pos}", reason="truncated_tar", path=path)
            pos += len(data)
            if typeflag == b"L":
                long_name = data[:size].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            else:
                try:
                    pax = _parse_pax(data[:size])
                    pax_size = int(pax["size"]) if "size" in pax else None
                except ValueError as e:
                    raise SourceError(f"{path}: corrupt pax header at byte {header_pos}: {e}", reason="corrupt_tar",
                                      path=path) from None
                if pax_size is not None and pax_size < 0:
                    raise SourceError(f"{path}: negative size in pax header at byte {header_pos}", reason="corrupt_tar",
                                      path=path)
            continue
        if long_name is not None:
            name = long_name
        if "path" in pax:
            name = pax["path"]
        if "size" in pax:
            size = int(pax["size"])
        if typeflag in _REGULAR:
            kind = "file"
        elif typeflag == b"1":
            kind = "hardlink"
        elif typeflag == b"2":
            kind = "symlink"
        elif typeflag in (b"3", b"4", b"6"):
            kind = "device"
        elif typeflag in _SKIP_QUIETLY:
            kind = "skip"
        else:
            kind = "other"
        if kind in ("hardlink", "symlink", "device"):
            size = 0  # link and device members carry no data
        elif kind == "file" and size > MAX_MEMBER:
            kind = "oversized"  # skipped (read through, never held), reported by the sources
        member = Member(name, kind, size, ext_start, pos, pos + padded(size))
        ext_start, long_name, pax = None, None, {}
        try:
            if kind == "file":
                data = _read_exact(f, size)
                if len(data) < size:
                    raise _truncated(path, name, f"{len(data)} of {size} bytes")
                pad = padded(size) - size
                if pad and len(_read_exact(f, pad)) < pad and require_eof:
                    raise _truncated(path, name, "padding")
            else:
                data = None
                got = _skip(f, padded(size))
                if got < size:
                    raise _truncated(path, name, f"{got} of {size} bytes")
        except EOFError as e:  # a compressed stream that ends early
            raise _truncated(path, name, str(e)) from None
        pos = member.end
        last_name = name
        if kind == "skip":
            continue
        yield member, data


def _truncated(path: str, name: str, detail: str) -> SourceError:
    """The archive ends inside member ``name``; ``.member`` tells readers which one (the samples
    before it are complete)."""
    e = SourceError(f"{path}: member {name!r} is truncated ({detail})", reason="truncated_tar", path=path)
    e.member = name  # type: ignore[attr-defined]
    return e
