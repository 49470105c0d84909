"""One writer per output directory: an advisory ``fcntl.flock`` on ``OUT/.dataprune.lock``, held
for the whole run and released by the kernel when the process dies (no stale locks after a crash
or a kill -9). A second run on the same output stops at once with one line naming the holder."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from .errors import ConfigError, OutputLocked

LOCK_NAME = ".dataprune.lock"


@contextmanager
def output_lock(out_dir: str, command: str) -> Iterator[None]:
    """Hold the lock of ``out_dir`` (created if missing) while the block runs. Under torchrun the
    caller takes it on rank 0 only. Re-entrant within one process (a run that locks a directory it
    already holds, e.g. ``curve`` training inside its own --out, passes)."""
    real = os.path.realpath(out_dir)
    if real in _held:
        _held[real] += 1
        try:
            yield
        finally:
            _held[real] -= 1
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"{out_dir} exists and is not a directory; choose a directory for the output")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except FileExistsError:  # a dangling symlink
        raise ConfigError(f"{out_dir} exists and is not a directory; choose a directory for the output") from None
    path = os.path.join(out_dir, LOCK_NAME)
    if os.path.islink(path):
        raise OutputLocked(f"{path} is a symbolic link; refusing to use it as the output lock")
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise OutputLocked(f"{path}: cannot be used as the output lock ({e.strerror}); remove it") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a FIFO, device, or a hard link to a file elsewhere: never written
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise OutputLocked(f"{path} is {what}; refusing to use it as the output lock (remove it)")
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputLocked(f"{out_dir} is being written by another dataprune run ({_holder(fd)}); wait for it to finish, "
                               "or use another --out") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "argv": sys.argv[1:6]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _held[real] = 1
        try:
            yield
        finally:
            del _held[real]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        d = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"{d.get('command', '?')}, pid {d.get('pid', '?')} on {d.get('host', '?')} since {d.get('started', '?')}"
    except (ValueError, OSError, AttributeError):
        return "holder unknown"


_held: dict[str, int] = {}
