"""A small, strict tar reader and a deterministic tar writer.

Python's ``tarfile`` silently stops at a corrupt or truncated header after the first member, which
would lose samples without telling anyone. This reader works on any forward-only stream (plain
file, gzip stream, fsspec file), reports the exact byte offsets of every member (so export can copy
a sample's blocks back out by location), and raises :class:`~dataprune.errors.SourceError` with the
file and member for every kind of damage.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from .errors import SourceError

BLOCK = 512
RECORD = 20 * BLOCK
_REGULAR = (b"0", b"\x00", b"7")
_SKIP_QUIETLY = (b"5", b"g")  # directories, global pax headers: not samples


@dataclass
class Member:
    name: str
    kind: str  # "file", or why it is not one ("symlink", "hardlink", "device", "other")
    size: int
    offset: int  # first byte of the member's first header block (extension headers included)
    data_offset: int
    end: int  # first byte after the member's padded data

    @property
    def is_file(self) -> bool:
        return self.kind == "file"


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.split(b"\x00", 1)[0].strip()
    return int(text, 8) if text else 0


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
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        record = data[sp + 1 : pos + length - 1]
        k, _, v = record.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _read_exact(f: BinaryIO, n: int) -> bytes:
    chunks = []
    remaining = n
    while remaining:
        chunk = f.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def _skip(f: BinaryIO, n: int) -> int:
    """Advance ``n`` bytes; returns how many were actually available."""
    if n <= 0:
        return 0
    try:
        if f.seekable():
            here = f.tell()
            end = f.seek(0, io.SEEK_END)
            f.seek(min(here + n, end))
            return min(n, end - here)
    except (OSError, AttributeError):
        pass
    done = 0
    while done < n:
        chunk = f.read(min(1 << 20, n - done))
        if not chunk:
            break
        done += len(chunk)
    return done


def iter_members(
    f: BinaryIO, path: str, *, start: int = 0, want_data=lambda m: True, require_eof: bool = True
) -> Iterator[tuple[Member, bytes | None]]:
    """Yield ``(member, data)`` for every member of the tar stream ``f``.

    ``data`` is the member's bytes when it is a regular file and ``want_data(member)`` is true,
    else ``None`` (the bytes are skipped). ``start`` is the stream position of ``f`` (offsets are
    reported relative to the whole file). Raises SourceError naming ``path`` and the member.
    """
    pos = start
    ext_start: int | None = None
    long_name: str | None = None
    pax: dict[str, str] = {}
    last_name = None
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
            data = _read_exact(f, _padded(size))
            if len(data) < _padded(size):
                raise SourceError(f"{path}: truncated extended header at byte {header_pos}", reason="truncated_tar", path=path)
            pos += len(data)
            if typeflag == b"L":
                long_name = data[:size].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            else:
                pax = _parse_pax(data[:size])
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
        member = Member(name, kind, size, ext_start, pos, pos + _padded(size))
        ext_start, long_name, pax = None, None, {}
        if kind == "file" and want_data(member):
            data = _read_exact(f, size)
            if len(data) < size:
                raise SourceError(
                    f"{path}: member {name!r} is truncated ({len(data)} of {size} bytes)",
                    reason="truncated_tar",
                    path=path,
                )
            pad = _padded(size) - size
            if pad and len(_read_exact(f, pad)) < pad and require_eof:
                raise SourceError(f"{path}: member {name!r} is truncated (padding)", reason="truncated_tar", path=path)
        else:
            data = None
            got = _skip(f, _padded(size))
            if got < size:
                raise SourceError(
                    f"{path}: member {name!r} is truncated ({got} of {size} bytes)", reason="truncated_tar", path=path
                )
        pos = member.end
        last_name = name
        if kind == "skip":
            continue
        yield member, data


def member_header(name: str, size: int) -> bytes:
    """A deterministic header for a regular file: mtime 0, uid/gid 0, no user names, mode 0444."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def padding(size: int) -> bytes:
    return b"\x00" * (_padded(size) - size)


def end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record (as tarfile and GNU tar write)."""
    total = written + 2 * BLOCK
    return b"\x00" * (2 * BLOCK + (-total) % RECORD)
