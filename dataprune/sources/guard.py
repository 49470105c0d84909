"""Untrusted input, checked in one place: every source reads files, names, labels and locations
through these helpers.

* Files: only regular files are ever opened for reading (``os.stat`` first, then ``O_NONBLOCK`` so
  a FIFO swapped in between cannot block, then ``fstat`` on the open descriptor); sizes come from
  ``fstat``, never from the input.
* Paths: "inside the dataset" compares real paths (a symlink leaving the root is outside); for an
  open file the kernel's own path of the descriptor is used (``/proc/self/fd``), so a symlink swapped
  in after the check cannot lead the read elsewhere.
* Names that are not valid UTF-8, labels that are not 32-bit integers, rows whose key or location
  fields are null, negative or of the wrong type: per-sample problems with a reason, never a
  traceback.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import stat
from typing import BinaryIO

from ..errors import SourceError
from ..tables import LABEL_MAX

LABEL_MIN = -LABEL_MAX - 1  # labels are stored as int32 (tables.LABEL_MAX)
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_PROC_FD = "/proc/self/fd"


class Refused(Exception):
    """A file that is not read: ``reason`` is the skip reason, ``detail`` says why (no path in it)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ----------------------------------------------------------------------------------------- names

def unsafe_name(name: str) -> bool:
    """Absolute paths, ``..`` components, backslashes and NULs are never allowed in keys."""
    if not name or name[0] == "/" or "\\" in name or "\x00" in name or name[1:2] == ":":  # ... or C:foo
        return True
    return ".." in name and any(part == ".." for part in name.split("/"))  # split only when it could matter


def valid_utf8(name: str) -> bool:
    """False for names holding undecodable bytes (``os`` gives them back as lone surrogates)."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escape_name(name: str) -> str:
    """A printable, valid UTF-8 stand-in for a name with undecodable bytes (``\\xff`` escapes)."""
    if valid_utf8(name):
        return name
    try:
        raw = name.encode("utf-8", "surrogateescape")  # the bytes the file system holds
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def shown(text) -> str:
    """``text`` for a one-line message: as it is when printable, else its repr (newlines, escapes)."""
    text = text if isinstance(text, str) else repr(text)
    return text if text.isprintable() and valid_utf8(text) else repr(text)


# ----------------------------------------------------------------------------------------- labels

def check_label(value) -> int:
    """``value`` as a 32-bit label: an integer, an integral float or a decimal integer string.
    Raises ValueError (saying why) for booleans, fractions (2.7), inf/NaN, other types and values
    outside int32."""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8")  # UnicodeDecodeError is a ValueError
    if isinstance(value, bool):
        raise ValueError(f"label {value!r} is a boolean, not an integer")
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 20 or not _INT_TEXT.fullmatch(text):
            raise ValueError(f"label {value[:40]!r} is not an integer")
        n = int(text)
    elif isinstance(value, numbers.Integral):
        n = int(value)
    elif isinstance(value, numbers.Number) or hasattr(value, "is_integer"):  # float, Decimal, numpy floats
        try:
            finite = math.isfinite(value)
            n = int(value)
        except (ValueError, OverflowError, TypeError):
            raise ValueError(f"label {value!r} is not an integer") from None
        if not finite or n != value:
            raise ValueError(f"label {value!r} is not an integer")
    else:
        raise ValueError(f"label is {type(value).__name__}, not an integer")
    if not LABEL_MIN <= n <= LABEL_MAX:
        raise ValueError(f"label {n} is outside the 32-bit integer range")
    return n


# ------------------------------------------------------------------------------------- locations

def check_row(loc_path, key, offset, size) -> None:
    """A location row from a manifest (untrusted): a non-empty safe key, a path, non-negative
    integer offset and size. Raises SourceError naming the row (reasons ``bad_key``,
    ``unsafe_name``, ``bad_location``)."""
    if type(key) is str and key.isascii() and key and type(loc_path) is str and loc_path and not unsafe_name(key) \
            and "\x00" not in loc_path and type(offset) is int and type(size) is int and offset >= 0 and size >= 0:
        return  # the usual row, quickly
    where = shown(loc_path)
    if not isinstance(key, str) or not key:
        raise SourceError(f"{where}: a row without a usable key ({key!r})", reason="bad_key", path=str(loc_path))
    if unsafe_name(key) or not valid_utf8(key):
        raise SourceError(f"{where}: unsafe key {shown(key)} in the manifest", reason="unsafe_name", path=str(loc_path))
    if not isinstance(loc_path, str) or not loc_path or "\x00" in loc_path:
        raise SourceError(f"{where}: sample {key!r} has no usable location path", reason="bad_location")
    for name, v in (("loc_offset", offset), ("loc_size", size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise SourceError(f"{where}: sample {key!r}: {name} {v!r} is not a non-negative integer",
                              reason="bad_location", path=loc_path)


def is_inside(real: str, root: str, is_dir: bool = True) -> bool:
    """``real`` (a real path) is ``root`` or, for a directory root, below it."""
    if real == root:
        return True
    return is_dir and real.startswith(root if root.endswith(os.sep) else root + os.sep)


def real_path(path: str) -> str:
    local = path[len("file://"):] if path.startswith("file://") else path
    return os.path.realpath(local)


def opened_path(fd: int, fallback: str) -> str:
    """The real path of the open file ``fd``, as the kernel sees it (``fallback``'s realpath where
    /proc is not available)."""
    try:
        return os.readlink(f"{_PROC_FD}/{fd}")
    except OSError:
        return os.path.realpath(fallback)


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def open_regular_fd(path: str, inside: str | None = None) -> tuple[int, os.stat_result, str]:
    """Open the regular file ``path`` for reading: ``(fd, fstat, real path)``. Nothing else is ever
    opened (checked with ``stat`` first; ``O_NONBLOCK`` against a FIFO slipped in; ``fstat`` after).
    With ``inside`` (a real directory), a file whose real path is not under it is refused
    (``outside_root``); anything but a regular file is ``not_regular_file``. Raises :class:`Refused`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Refused("missing_file", "no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise Refused("unreadable", f"cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(st.st_mode):
        link = f" (through a symbolic link to {shown(os.path.realpath(path))})" if os.path.islink(path) else ""
        raise Refused("not_regular_file", f"is a {kind_of(st.st_mode)}{link}, not a regular file")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise Refused("unreadable", f"cannot read ({e.strerror or e})") from None
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise Refused("not_regular_file", f"became a {kind_of(fst.st_mode)} while being opened")
        real = opened_path(fd, path)
        if inside is not None and not is_inside(real, inside):
            raise Refused("outside_root", f"resolves to {shown(real)}, outside the dataset ({shown(inside)})")
    except BaseException:
        os.close(fd)
        raise
    return fd, fst, real


def read_regular(path: str, inside: str | None = None, size: int | None = None) -> tuple[bytes, str]:
    """The bytes of the regular file ``path`` and its real path (see :func:`open_regular_fd`). With
    ``size``, a file of another size is refused (``stale_location``) before anything is read."""
    fd, fst, real = open_regular_fd(path, inside)
    try:
        if size is not None and fst.st_size != size:
            raise Refused("stale_location", f"is {fst.st_size} bytes, not the {size} bytes of its location; the file "
                                            "changed since it was listed, or the location is wrong")
        chunks, left = [], fst.st_size  # never more than the file holds
        while left > 0:
            try:
                chunk = os.read(fd, min(left, 1 << 26))
            except OSError as e:
                raise Refused("unreadable", f"cannot read ({e.strerror or e})") from None
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), real
    finally:
        os.close(fd)


def open_regular(path: str, buffering: int = 1 << 20) -> BinaryIO:
    """A buffered binary reader on the regular file ``path``. Raises :class:`Refused`."""
    fd, _, _ = open_regular_fd(path)
    return os.fdopen(fd, "rb", buffering=buffering)


def read_classes(path: str) -> list[str] | None:
    """``classes.txt`` (one name a line), when it is a regular file."""
    if not os.path.isfile(path):
        return None
    try:
        with open_regular(path) as fh:
            text = fh.read(16 << 20).decode("utf-8", "replace")  # class names, not a file to hold whole
    except (OSError, Refused):
        return None
    lines = [ln.strip() for ln in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()  # trailing blank lines; a blank line inside keeps its label's place (its name is empty)
    return lines or None
