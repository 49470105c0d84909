"""The writing half of dataprune's tar code: deterministic member headers (mtime 0, uid/gid 0, no
user names, mode 0444), padding and the end-of-archive blocks, byte-identical to ``tarfile``'s
PAX_FORMAT output; ``headers_array`` builds many headers at once for the export fast path."""

from __future__ import annotations

import tarfile

import numpy as np

BLOCK = 512
RECORD = 20 * BLOCK


def padded(n: int) -> int:
    """``n`` rounded up to whole blocks."""
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _header_template() -> tuple[bytes, int]:
    """The header of an empty-named, empty member, and its checksum with name, size and checksum
    fields blanked (checksum spaces counted): a header for ``(name, size)`` is this template with those
    three fields filled in."""
    info = tarfile.TarInfo("")
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0, 0o444, 0, 0, "", ""
    t = bytearray(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
    t[0:100] = bytes(100)
    t[124:136] = bytes(12)
    t[148:156] = b" " * 8
    return bytes(t), sum(t)


TEMPLATE, TEMPLATE_SUM = _header_template()
_MAX_OCTAL_SIZE = 8**11  # sizes from here on need a pax "size" record
TEMPLATE_ARR = np.frombuffer(TEMPLATE, np.uint8)
_OCTAL_SHIFTS = np.arange(30, -1, -3, dtype=np.int64)  # 11 octal digits, most significant first


def member_header(name: str, size: int) -> bytes:
    """A deterministic header for a regular file: mtime 0, uid/gid 0, no user names, mode 0444.

    Byte-identical to ``tarfile``'s PAX_FORMAT header for the same fields (a pax extended header is
    prepended for names over 100 bytes, non-ASCII names and sizes of 8 GiB and more); the common case
    is built directly from a template, ~20x faster than ``tarfile``.
    """
    if size < _MAX_OCTAL_SIZE and len(name) <= 100 and name.isascii():
        raw = name.encode("ascii")
        digits = b"%011o\x00" % size
        h = bytearray(TEMPLATE)
        h[0 : len(raw)] = raw
        h[124:136] = digits
        h[148:156] = b"%06o\x00 " % (TEMPLATE_SUM + sum(raw) + sum(digits))
        return bytes(h)
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def padding(size: int) -> bytes:
    return b"\x00" * (padded(size) - size)


def end_of_archive(written: int) -> bytes:
    """Two zero blocks, then zeros up to a whole record (as tarfile and GNU tar write)."""
    total = written + 2 * BLOCK
    return b"\x00" * (2 * BLOCK + (-total) % RECORD)


def headers_array(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Vectorised :func:`member_header`: ``names`` is an (n, 100) uint8 array of ASCII names, NUL
    padded; ``sizes`` (n,) int64 below 8 GiB. Returns an (n, 512) uint8 array of headers."""
    n = len(sizes)
    out = np.empty((n, BLOCK), np.uint8)
    out[:] = TEMPLATE_ARR
    out[:, 0:100] = names
    digits = ((sizes[:, None] >> _OCTAL_SHIFTS[None, :]) & 7).astype(np.uint8) + ord("0")
    out[:, 124:135] = digits
    out[:, 135] = 0
    chk = TEMPLATE_SUM + names.sum(axis=1, dtype=np.int64) + digits.sum(axis=1, dtype=np.int64)
    chk_digits = ((chk[:, None] >> np.arange(15, -1, -3, dtype=np.int64)[None, :]) & 7).astype(np.uint8) + ord("0")
    out[:, 148:154] = chk_digits
    out[:, 154] = 0
    out[:, 155] = ord(" ")
    return out
