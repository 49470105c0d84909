"""The vectorised WebDataset -> WebDataset route of the wds writer (:class:`_FastPath`).

The selected samples' tar blocks are read straight into one buffer per batch (one ``preadv`` per
run of adjacent samples), every member header is checked and rebuilt with numpy, and the buffer is
written in one call. It produces exactly the bytes of the per-sample path; anything it does not
handle (pax or GNU long-name headers, non-ASCII names, keys that need renaming, compressed or remote
shards, stale locations) sends that batch down the per-sample path, which also reports the errors.

Batches of very large samples (≥ ``KERNEL_MIN`` on average) take the kernel route of :mod:`.kcopy`
instead: only headers are read, member data is copied by the kernel — the same bytes again. Below
that the buffers cost less CPU (here a kernel copy costs what a read plus a write does, and the
kernel route plans each sample in Python, ~20 µs, where a batch's numpy cost is shared by its samples).

Knows the writer only as something with ``add_block`` (:class:`BlockSink`); ``wds.py`` imports this
module, never the other way round.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa

from .. import tario, tarwrite
from . import kcopy
from ..sources.base import is_url
from ..sources.guard import Refused, open_regular_fd
from ..tables import as_numpy, dict_column
from .base import ExportStats
from .names import text_problem

FAST_CHUNK = 16384  # samples per vectorised chunk (the driver also bounds a chunk's bytes)
_MAX_MEMBERS = 256  # members per sample the fast path follows (more: per-sample path)
_MAX_ROW = 64 << 20  # bytes of one sample the fast path reads into its buffer (larger: per-sample path)
_MICRO = 4 << 20  # bytes per batch: the buffer stays in cache between read, patch and write
_MICRO_LARGE = 8 << 20  # ... when samples average kcopy.BIG or more (ImageNet-size: ~70 samples a batch)
KERNEL_MIN = 1 << 20  # average bytes per sample from which a batch takes the kernel route (kcopy)
_OCT = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_USTAR64 = int.from_bytes(b"ustar", "little")


def _key_matrix(keys: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """(n, w + 2) uint8 key bytes (NUL padded; w the longest key) and lengths, straight from the
    Arrow string buffers; None when any key is not plain ASCII, too long for a 100-byte name with an
    extension, or unsafe."""
    keys = keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys
    n = len(keys)
    if n == 0 or keys.null_count or not pa.types.is_string(keys.type):
        return None
    _, offsets_buf, data_buf = keys.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, n + 1, keys.offset * 4)
    lengths = np.diff(offsets).astype(np.int64)
    if lengths.max() >= 98 or lengths.min() == 0:
        return None
    w = int(lengths.max())
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    cols = np.arange(w + 2)[None, :]
    inside = cols < lengths[:, None]
    idx = np.where(inside, offsets[:-1, None].astype(np.int64) + cols, 0)
    K = np.where(inside, data[idx] if len(data) else 0, 0).astype(np.uint8)
    klen = lengths
    if (K >= 127).any() or ((K == 0) & inside).any():  # not ASCII (or DEL), or a NUL inside a key: names.path_problem refuses them
        return None
    slash = K == ord("/")
    dot = K == ord(".")
    # unsafe: absolute, backslash, control bytes, "C:", or a ".." component
    prev_sep = np.ones_like(slash)
    prev_sep[:, 1:] = slash[:, :-1]
    dotdot = dot[:, :-2] & dot[:, 1:-1] & prev_sep[:, :-2] & (slash[:, 2:] | (K[:, 2:] == 0))
    if ((K[:, 0] == ord("/")).any() or (K[:, 1] == ord(":")).any() or dotdot.any()
            or ((K == ord("\\")) | ((K < 32) & inside)).any()):
        return None
    # a dot in the key's basename would make webdataset split the key differently
    last_slash = np.where(slash.any(axis=1), w + 1 - np.argmax(slash[:, ::-1], axis=1), -1)
    if (dot & (cols > last_slash[:, None])).any():
        return None
    return K, klen


_EXT_OK = np.zeros(256, bool)
_EXT_OK[32:127] = True  # printable ASCII: no control byte, no DEL (names.text_problem)
_EXT_OK[ord("/")] = False
_EXT_OK[ord("A") : ord("Z") + 1] = False  # the per-sample path lower-cases extensions


def _suffix_ok(b: bytes, full_width: bool) -> bool:
    """The rest of a member name after its key: empty or ``.<ext>``, then only NULs (at least one
    unless the name fills all 100 bytes)."""
    name, nul, rest = b.partition(b"\x00")
    if rest.strip(b"\x00") or (not nul and not full_width):
        return False
    return not name or (name[:1] == b"." and all(_EXT_OK[c] for c in name[1:]))


def _distinct(a: np.ndarray) -> int:
    """How many distinct values ``a`` holds (not ``np.unique``: its first call imports numpy.ma, ~20 ms)."""
    s = np.sort(a)
    return int(len(s) and 1 + np.count_nonzero(s[1:] != s[:-1]))


def _ints(col) -> np.ndarray | None:
    """An integer column as numpy (no pandas import, which pyarrow's ``to_numpy`` does); None with nulls."""
    if col.null_count or not pa.types.is_integer(col.type):
        return None
    return as_numpy(col).astype(np.int64, copy=False)


class BlockSink(Protocol):
    def add_block(self, keys: list[str], sizes: np.ndarray, parts: np.ndarray, emit: Callable) -> bool:
        """Write finished tar blocks of ``len(keys)`` samples of output parts ``parts``
        (``emit(f, a, b)`` writes the batch's bytes ``[a, b)`` to ``f``); False (nothing written) if it cannot."""


class _FastPath:
    """WebDataset -> WebDataset by blocks (see the module docstring). Header fields are rebuilt, not
    trusted: name and size are checked against the manifest's key and location (the member names
    must be ``<key>.<ext>`` and the members must exactly fill ``loc_size``), everything else is
    overwritten with :func:`tario.member_header`'s fields; padding bytes must be zero (or are zeroed).
    Manifests are untrusted: only regular files the bound source contains are opened (``bind``), and
    a location must lie inside its file, or the batch goes down the per-sample path, which reports it.
    Header checksums are not re-verified (every field used is checked, the rest is rewritten; a
    checksum would guard only the rewritten fields, at ~12 % of the throughput)."""

    GAP = 32 << 10  # read through gaps up to this size (into a scratch buffer) rather than make another call
    chunk_rows = FAST_CHUNK

    def __init__(self, writer: BlockSink, stats: ExportStats, progress, source=None):
        self.writer, self.stats, self.progress = writer, stats, progress
        self.files: OrderedDict[str, int] = OrderedDict()
        self.buf = np.empty(_MICRO + (1 << 20), np.uint8)  # grown for larger batches
        self.junk = memoryview(bytearray(self.GAP))
        self.source = source  # reads only locations it contains (real paths inside the dataset); None: every
        # batch takes the per-sample path, which checks locations itself
        self.sizes: dict[str, int] = {}  # vetted path -> its size; -1: not readable here

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()

    def _size(self, path) -> int:
        """The size of the regular file ``path`` inside the dataset; -1 for anything else (a
        location the per-sample path must judge and report)."""
        got = self.sizes.get(path)
        if got is None:
            got = -1
            if isinstance(path, str) and not is_url(path) and not path.lower().endswith((".gz", ".tgz")) \
                    and self.source.contains(path):
                got = self._open(path)
            self.sizes[path] = got
        return got

    def _open(self, path: str) -> int:
        """Open a vetted location (guard.open_regular_fd: only a regular file, its real path inside the
        dataset) and keep its descriptor; its size, or -1 when it is refused."""
        try:
            fd, fst, real = open_regular_fd(path)
        except Refused:
            return -1
        if not self.source.contains(real):
            os.close(fd)
            return -1
        self.files[path] = fd
        if len(self.files) > 32:
            os.close(self.files.popitem(last=False)[1])
        return fst.st_size

    def _fd(self, path: str) -> int | None:
        """The kept descriptor of a vetted location (opened again if it was closed to bound them)."""
        if path not in self.files and self._open(path) < 0:
            return None
        return self.files[path]

    def run(self, sub: pa.Table, slow: Callable[[pa.Table], None]) -> None:
        """Export ``sub`` (rows in output order); batches the fast path cannot take go to ``slow``."""
        n = sub.num_rows
        offs, sizes = (_ints(sub.column(c)) for c in ("loc_offset", "loc_size"))
        paths = dict_column(sub.column("loc_path"))
        path_codes = as_numpy(paths.indices, fill=0).astype(np.int64)
        path_names = paths.dictionary.to_pylist()
        km = _key_matrix(sub.column("key")) if n and self.source is not None else None
        if (km is None or offs is None or sizes is None or paths.null_count or (sizes > _MAX_ROW).any()
                or any(text_problem(x) is not None for x in dict_column(sub.column("shard")).dictionary.to_pylist())
                or (sizes <= 0).any() or (sizes % tario.BLOCK).any() or (offs % tario.BLOCK).any() or (offs < 0).any()):
            slow(sub)
            return
        limit = np.array([self._size(p) for p in path_names], np.int64)[path_codes]  # locations are untrusted:
        if (limit < 0).any() or (offs > limit).any() or (sizes > limit - offs).any():  # inside the dataset, inside the file
            slow(sub)
            return
        K, klen = km
        ksum = K.sum(axis=1, dtype=np.int64)
        keys = sub.column("key").to_pylist()
        parts = as_numpy(sub.column("part"))
        shards = dict_column(sub.column("shard"))
        shard_codes = as_numpy(shards.indices, fill=0)
        kept = np.zeros(len(shards.dictionary), np.int64)
        cum = np.cumsum(sizes)
        micro = _MICRO_LARGE if n and int(cum[-1]) >= kcopy.BIG * n else _MICRO
        r0 = 0
        while r0 < n:
            base = cum[r0 - 1] if r0 else 0
            r1 = min(max(int(np.searchsorted(cum, base + micro, side="right")), r0 + 1), n)
            t0 = time.perf_counter()
            big = sizes[r0:r1].sum() >= KERNEL_MIN * (r1 - r0) and _distinct(path_codes[r0:r1]) <= 16  # (fds stay open)
            ok = kcopy.batch(self, r0, r1, offs, sizes, path_codes, path_names, keys, parts) if big else self._batch(r0, r1, offs, sizes, path_codes, path_names, keys, K, klen, ksum, parts)
            self.stats.write_s += time.perf_counter() - t0
            if ok:
                kept += np.bincount(shard_codes[r0:r1], minlength=len(kept))
            else:
                slow(sub.slice(r0, r1 - r0))
            r0 = r1
        for name, c in zip(shards.dictionary.to_pylist(), kept.tolist()):
            if c:
                per = self.stats.shard(name)
                per["seen"] += c
                per["kept"] += c

    def _read(self, m, o, c, sz, starts, path_names, mv) -> bool:
        """Fill the buffer with the samples' blocks, in output order: one ``preadv`` per stretch of a
        source file (sorted by offset), scattering each run of neighbouring samples straight to its
        place in the buffer and the gaps between wanted samples (up to GAP) into a scratch buffer."""
        order = np.lexsort((o, c))
        o_s, c_s, sz_s, st_s = o[order], c[order], sz[order], starts[order]
        gap = np.zeros(m, np.int64)
        gap[1:] = o_s[1:] - (o_s[:-1] + sz_s[:-1])
        stretch = np.ones(m, bool)  # starts a new preadv
        stretch[1:] = (c_s[1:] != c_s[:-1]) | (gap[1:] < 0) | (gap[1:] > self.GAP)
        piece = stretch.copy()  # starts a new piece of the output buffer
        piece[1:] |= (gap[1:] != 0) | (st_s[1:] != st_s[:-1] + sz_s[:-1])
        first = np.flatnonzero(piece)
        length = np.add.reduceat(sz_s, first)
        new = stretch[first]
        new[::500] = True  # bounded iovec count per call
        skip = np.where(new, 0, gap[first])
        t0 = time.perf_counter()
        junk = self.junk
        iov: list = []
        fd = at = want = 0
        for ln, g, nw, out, src, code in zip(length.tolist(), skip.tolist(), new.tolist(), st_s[first].tolist(),
                                             o_s[first].tolist(), c_s[first].tolist()):
            if nw:
                if iov and kcopy.preadv_into(fd, iov, at, want) != want:
                    return False
                fd = self._fd(path_names[code])
                if fd is None:
                    return False
                iov, at, want = [], src, 0
            elif g:
                iov.append(junk[:g])
                want += g
            iov.append(mv[out : out + ln])
            want += ln
        if iov and kcopy.preadv_into(fd, iov, at, want) != want:
            return False
        self.stats.read_s += time.perf_counter() - t0
        self.stats.write_s -= time.perf_counter() - t0
        return True

    def _batch(self, r0, r1, offs, sizes, path_codes, path_names, keys, K, klen, ksum, parts) -> bool:
        m = r1 - r0
        sz = sizes[r0:r1]
        ends = np.cumsum(sz)
        starts = ends - sz
        total = int(ends[-1])
        if total > len(self.buf):
            self.buf = np.empty(total, np.uint8)
        buf = self.buf[:total]
        blocks = buf.reshape(-1, tario.BLOCK)
        if not self._read(m, offs[r0:r1], path_codes[r0:r1], sz, starts, path_names, memoryview(buf)):
            return False
        # walk the members of every sample at once; check, then rebuild each header in place
        words = buf.view(np.uint64).reshape(-1, tario.BLOCK // 8)
        Kb, kb, ksb = K[r0:r1], klen[r0:r1], ksum[r0:r1]
        wk = int(kb.max())
        uniform = int(kb.min()) == wk
        width = min(100, (wk + 1 + 16 + 7) // 8 * 8)  # name bytes examined; the rest must be NUL
        cols = np.arange(width)[None, :]
        pos = starts.copy()
        active = np.arange(m)
        payload = 0
        for _ in range(_MAX_MEMBERS):
            if active.size == 0:
                break
            hb = pos[active] >> 9
            k = len(hb)
            head = blocks[hb, :width]
            szf = blocks[hb, 124:136]  # size: 11 octal digits and a NUL, as tarfile and GNU tar write it
            w8 = szf[:, :8].copy().view("<u8").ravel()
            w4 = szf[:, 8:12].copy().view("<u4").ravel()
            ok = ((w8 & 0xF8F8F8F8F8F8F8F8) == 0x3030303030303030) & ((w4 & 0xFFF8F8F8) == 0x00303030)
            tf = blocks[hb, 156]
            ok &= (tf == 48) | (tf == 0)
            tail = blocks[hb, 257:265].copy().view("<u8").ravel()
            ok &= (tail & 0xFFFFFFFFFF) == _USTAR64
            posix = (tail >> 40) & 0xFF == 0  # "ustar\0" (POSIX; GNU has "ustar ") : no name prefix allowed
            if posix.any():
                ok[posix] &= blocks[hb[posix], 345] == 0
            digits = szf[:, :11].astype(np.int64) - 48
            if width < 100:
                ok &= (blocks[hb, 96:100] == 0).all(axis=1)
                if width < 96:
                    ok &= (words[hb, width // 8 : 12] == 0).all(axis=1)
            size = digits @ _OCT
            if uniform:  # usual case: every key as long -> check each distinct suffix once
                ok &= (head[:, :wk] == Kb[active, :wk]).all(axis=1)
                sfx = head[:, wk:]
                if (sfx == sfx[0]).all():  # e.g. every member of this round is ".jpg"
                    v = sfx[0].tobytes()
                    if not _suffix_ok(v, width == 100):
                        return False
                    namesum = ksb[active] + sum(v)
                else:
                    suf = np.ascontiguousarray(sfx).view(f"V{width - wk}").ravel()
                    uniq, inv = np.unique(suf, return_inverse=True)
                    usum = np.empty(len(uniq), np.int64)
                    for u, v in enumerate(uniq.tolist()):
                        if not _suffix_ok(v, width == 100):
                            return False
                        usum[u] = sum(v)
                    namesum = ksb[active] + usum[inv.ravel()]
            else:
                kl = kb[active]
                ok &= ((head[:, :wk] == Kb[active, :wk]) | (cols[:, :wk] >= kl[:, None])).all(axis=1)
                rows = np.arange(k)
                sep = head[rows, kl]
                ok &= (sep == ord(".")) | (sep == 0)
                iszero = head == 0
                nul = np.argmax(iszero, axis=1)
                has_nul = iszero[rows, nul]
                if width < 100:
                    ok &= has_nul
                else:
                    nul = np.where(has_nul, nul, 100)
                ext = (cols > kl[:, None]) & (cols < nul[:, None])
                ok &= ~(ext & ~_EXT_OK[head]).any(axis=1) & ~(~iszero & (cols > nul[:, None])).any(axis=1)
                namesum = head.sum(axis=1, dtype=np.int64)
            if not ok.all():
                return False
            chk = tarwrite.TEMPLATE_SUM + namesum + szf.sum(axis=1, dtype=np.int64)
            new = np.empty((k, tario.BLOCK - 100), np.uint8)
            new[:] = tarwrite.TEMPLATE_ARR[100:]
            new[:, 24:36] = szf
            new[:, 48:54] = ((chk[:, None] >> _CHK_SHIFTS) & 7).astype(np.uint8) + 48
            new[:, 54] = 0
            new[:, 55] = 32
            blocks[hb, 100:] = new
            rem = size & (tario.BLOCK - 1)
            part = np.flatnonzero(rem)
            if part.size:  # padding after the data must be zero, as the per-sample path writes it
                lb = hb[part] + 1 + (size[part] >> 9)
                r = rem[part]
                W = words[lb]
                dirty = ((W != 0) & (_WORD_IDX >= ((r + 7) >> 3)[:, None])).any(axis=1)
                odd = (r & 7) != 0
                dirty |= odd & ((W[np.arange(len(r)), r >> 3] >> (8 * (r & 7)).astype(np.uint64)) != 0)
                if dirty.any():
                    L = blocks[lb[dirty]]
                    L[np.arange(tario.BLOCK)[None, :] >= r[dirty][:, None]] = 0
                    blocks[lb[dirty]] = L
            payload += int(size.sum())
            pos[active] += tario.BLOCK + ((size + tario.BLOCK - 1) >> 9 << 9)
            end = ends[active]
            if (pos[active] > end).any():
                return False
            active = active[pos[active] < end]
        if active.size:
            return False
        # write, cutting shards exactly where the per-sample path would
        mv = memoryview(buf)
        if not self.writer.add_block(keys[r0:r1], sz, parts[r0:r1], lambda f, a, b: f.write(mv[a:b])):
            return False
        self.stats.samples += m
        self.stats.bytes += payload
        if self.progress:
            self.progress(m, payload)
        return True


_CHK_SHIFTS = np.arange(15, -1, -3, dtype=np.int64)[None, :]
_WORD_IDX = np.arange(tario.BLOCK // 8)[None, :]
