"""Kernel-side copies for the WebDataset fast path: large member data goes from the input tar to the
output file with ``os.copy_file_range`` (falling back to ``os.sendfile``, then ``pread``/``write``),
never through a Python buffer; only each member's header and last, partial block are read.

:func:`plan_sample` reads and checks one sample's headers (the same checks as the vectorised
route in :mod:`.fastpath`, so a sample it accepts is written exactly as the per-sample path
writes it: normalised headers, zeroed padding) and returns its output as segments — bytes, or a
``(fd, offset, length)`` range of the input — that :func:`write_segments` writes.

``DATAPRUNE_COPY`` = ``copy_file_range`` | ``sendfile`` | ``readwrite`` forces one method (tests,
or a filesystem where the kernel copy misbehaves); the default tries them in that order and
drops one for the rest of the process at its first refusal (EXDEV, ENOSYS, EINVAL, ...).
"""

from __future__ import annotations

import errno
import os
from typing import Union

import numpy as np

from .. import tario, tarwrite

BIG = 32 << 10  # member data at least this large is copied by the kernel
WINDOW = 8 << 10  # bytes read at a time around headers
METHODS = ("copy_file_range", "sendfile", "readwrite")
_REFUSED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM, errno.ETXTBSY}
_dropped: set[str] = set()  # methods this process found refused
_preadv = getattr(os, "preadv", None)

Segment = Union[bytes, tuple]  # bytes to write, or (fd, offset, length) of the input to copy

_EXT_OK = bytes(c for c in range(32, 127) if c != ord("/") and not ord("A") <= c <= ord("Z"))


def _suffix_ok(b: bytes) -> bool:
    """A member name's rest after its key: empty or ``.<ext>`` (printable ASCII, no '/', no capitals),
    then NULs (none only when the name fills all 100 bytes); as :func:`.fastpath._suffix_ok`."""
    name, _, rest = b.partition(b"\x00")
    if rest.strip(b"\x00"):
        return False
    return not name or (name[:1] == b"." and not name[1:].translate(None, _EXT_OK))


class _Window:
    """Reads of one input file near a position, ``WINDOW`` bytes at a time, never past ``end``."""

    def __init__(self, fd: int, end: int):
        self.fd, self.end, self.at, self.data = fd, end, 0, b""

    def get(self, pos: int, n: int) -> bytes | None:
        if not (self.at <= pos and pos + n <= self.at + len(self.data)):
            self.at = pos
            self.data = os.pread(self.fd, max(n, min(WINDOW, self.end - pos)), pos)
            if len(self.data) < n:
                return None
        return self.data[pos - self.at : pos - self.at + n]


def plan_sample(fd: int, offset: int, size: int, key: bytes) -> tuple[list[Segment], int] | None:
    """The output of the sample whose tar blocks are ``[offset, offset + size)`` of ``fd`` and whose
    members must be named ``key.<ext>``, and its member bytes; None when it is anything the
    vectorised route would refuse."""
    end = offset + size
    win = _Window(fd, end)
    out: list[Segment] = []
    pos, members, payload = offset, 0, 0
    while pos < end:
        members += 1
        h = win.get(pos, tario.BLOCK)
        if h is None or members > 256 or h[257:262] != b"ustar" or h[156] not in (48, 0):
            return None
        if h[262] == 0 and h[345] != 0:  # POSIX ustar with a name prefix
            return None
        if h[124:135].translate(None, b"01234567") or h[135] != 0 or h[: len(key)] != key or not _suffix_ok(h[len(key) : 100]):
            return None
        n = int(h[124:135], 8)
        payload += n
        data = pos + tario.BLOCK
        nxt = data + tarwrite.padded(n)
        if nxt > end:
            return None
        new = bytearray(tarwrite.TEMPLATE)  # tarwrite.member_header(name, n), from the checked name and size fields
        new[0:100], new[124:136] = h[0:100], h[124:136]
        new[148:156] = b"%06o\x00 " % (tarwrite.TEMPLATE_SUM + sum(h[0:100]) + sum(h[124:136]))
        same = new == h  # the header needs no rewrite: it is copied from the input with its data
        out.append((fd, pos, tario.BLOCK) if same else bytes(new))
        whole = n // tario.BLOCK * tario.BLOCK
        if whole and (same or n >= BIG):
            out.append((fd, data, whole))
        elif whole:
            got = win.get(data, whole) if whole <= WINDOW else os.pread(fd, whole, data)
            if got is None or len(got) != whole:
                return None
            out.append(got)
        rem = n - whole
        if rem:  # the last block: the data, then zeros (padding is zeroed, as the other routes write it)
            tail = win.get(data + whole, tario.BLOCK)
            if tail is None:
                return None
            zero = not tail[rem:].strip(b"\x00")
            out.append((fd, data + whole, tario.BLOCK) if same and zero else tail[:rem] + bytes(tario.BLOCK - rem))
        pos = nxt
    return (out, payload) if pos == end else None


def batch(fp, r0: int, r1: int, offs, sizes, path_codes, path_names, keys, parts) -> bool:
    """Rows ``r0:r1`` of a fast-path chunk (``fp``: the :class:`.fastpath._FastPath`, for its vetted
    descriptors, writer and counters) with member data copied by the kernel; the same bytes as the
    vectorised route. False (nothing written) when a sample is anything it does not take."""
    plans, payload = [], 0
    for j in range(r0, r1):
        fd = fp._fd(path_names[path_codes[j]])
        got = None if fd is None else plan_sample(fd, int(offs[j]), int(sizes[j]), keys[j].encode("ascii"))
        if got is None:
            return False
        plans.append(got[0])
        payload += got[1]
    sz = sizes[r0:r1]
    at = {e: i for i, e in enumerate(np.concatenate([[0], np.cumsum(sz)]).tolist())}

    def emit(f, a: int, b: int) -> None:
        f.flush()  # the file object's buffer is empty: the kernel writes at the descriptor's position
        write_segments(f.fileno(), [seg for segs in plans[at[a] : at[b]] for seg in segs])

    if not fp.writer.add_block(keys[r0:r1], sz, parts[r0:r1], emit):
        return False
    fp.stats.samples += r1 - r0
    fp.stats.bytes += payload
    if fp.progress:
        fp.progress(r1 - r0, payload)
    return True


def write_segments(dst: int, segments: list[Segment]) -> None:
    """Write ``segments`` at ``dst``'s position: bytes with ``write`` (neighbours joined into one
    call), input ranges by the kernel (neighbouring ranges of one file — a run of samples whose
    headers need no rewrite — in one call)."""
    forced = os.environ.get("DATAPRUNE_COPY")
    pending: list[bytes] = []
    run: list = []  # [fd, offset, length] of the range being gathered

    def flush_run() -> None:
        if run:
            copy_range(run[0], dst, run[1], run[2], forced)
            run.clear()

    for seg in segments:
        if isinstance(seg, bytes):
            flush_run()
            pending.append(seg)
            continue
        if pending:
            _write_all(dst, b"".join(pending))
            pending = []
        if run and run[0] == seg[0] and run[1] + run[2] == seg[1]:
            run[2] += seg[2]
        else:
            flush_run()
            run[:] = seg
    flush_run()
    if pending:
        _write_all(dst, b"".join(pending))


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        mv = mv[os.write(fd, mv):]


def copy_range(src: int, dst: int, offset: int, length: int, forced: str | None = None) -> None:
    """Copy ``length`` bytes at ``offset`` of ``src`` to ``dst``'s position (advancing it); ``forced``:
    one method only (default: ``DATAPRUNE_COPY``)."""
    forced = forced or os.environ.get("DATAPRUNE_COPY")
    for method in ([forced] if forced in METHODS else METHODS):
        if method in _dropped and not forced:
            continue
        if _copy(method, src, dst, offset, length, fallback=not forced):
            return
        _dropped.add(method)  # refused before anything was copied: not tried again by this process
    raise OSError(errno.EIO, "no copy method worked")


def _copy(method: str, src: int, dst: int, offset: int, length: int, fallback: bool) -> bool:
    """Copy with one method; False when it is refused before copying anything (the caller falls back)."""
    done = 0
    while done < length:
        try:
            if method == "copy_file_range" and hasattr(os, "copy_file_range"):
                got = os.copy_file_range(src, dst, length - done, offset + done)
            elif method == "sendfile" and hasattr(os, "sendfile"):
                got = os.sendfile(dst, src, offset + done, length - done)
            elif method == "readwrite":
                data = os.pread(src, min(length - done, 1 << 20), offset + done)
                if data:
                    _write_all(dst, data)
                got = len(data)
            else:
                return False
        except OSError as e:
            if done == 0 and fallback and e.errno in _REFUSED:
                return False
            raise
        if got <= 0:
            if done == 0 and method != "readwrite":
                return False
            raise OSError(errno.EIO, f"the input ended {length - done} bytes early while copying")
        done += got
    return True


def preadv_into(fd: int, iov: list, offset: int, want: int) -> int:
    """Read ``want`` bytes at ``offset`` into the buffers ``iov`` (fewer only at end of file)."""
    done = 0
    while done < want:
        if _preadv is not None:
            got = _preadv(fd, iov, offset + done)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, want - done, offset + done)
            got = len(data)
            pos = 0
            for b in iov:
                n = min(len(b), got - pos)
                b[:n] = data[pos : pos + n]
                pos += n
        if got <= 0:
            break
        done += got
        if done < want:  # a short read: drop the buffers already filled
            rest, left = [], got
            for b in iov:
                if left >= len(b):
                    left -= len(b)
                else:
                    rest.append(b[left:])
                    left = 0
            iov = rest
    return done
