"""Embedding rows read from disk on demand: one cached ``.npy`` (:class:`NpyRows`), several end to
end (:class:`ConcatRows`), or rows picked from another set (:class:`PickedRows`).

They index like a numpy array (``x[a:b]``, ``x[int_array]``, ``x.shape``), so every tiled routine
(:func:`~dataprune.metrics.kmeans.load_rows`) takes them. Each read maps the file, copies the rows
asked for and unmaps it again: a process holds only the rows it is working on. (A memory map kept
open leaves every page it touched in the process's resident set — an N x D matrix read once through
a kept map is N x D resident, however small the blocks.)
"""

from __future__ import annotations

from typing import Any

import numpy as np


class NpyRows:
    """The rows of one ``.npy`` file (2-D), read on demand."""

    def __init__(self, path: str):
        m = np.load(path, mmap_mode="r")
        if m.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D array, got shape {m.shape}")
        self.path, self.shape, self.dtype = path, tuple(m.shape), m.dtype
        self._offset = int(m.offset) if isinstance(m, np.memmap) else 0
        del m

    def __getitem__(self, rows: Any) -> np.ndarray:
        if self.shape[0] == 0:
            return np.zeros((0, self.shape[1]), self.dtype)[rows]
        m = np.memmap(self.path, self.dtype, "r", self._offset, self.shape)
        try:
            return np.array(m[rows])
        finally:
            del m


def _as_index(rows: Any, n: int) -> np.ndarray:
    """Row positions in ``[0, n)``, read as numpy reads an index: slices, boolean masks, negative
    positions counted from the end; one outside the rows is an IndexError."""
    if isinstance(rows, slice):
        return np.arange(n, dtype=np.int64)[rows]
    idx = np.asarray(rows)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"a boolean index of shape {idx.shape} for {n} rows")
        return np.flatnonzero(idx).astype(np.int64)
    idx = idx.astype(np.int64)
    if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return np.where(idx < 0, idx + n, idx)


class ConcatRows:
    """Several row sets (same width) end to end, as one ``(sum of rows, D)`` set. ``dim`` gives the
    width when ``parts`` is empty."""

    def __init__(self, parts: list, dim: int | None = None, dtype: Any = np.float16):
        self.parts = list(parts)
        width = {int(p.shape[1]) for p in self.parts if p.shape[0]}
        if len(width) > 1:
            raise ValueError(f"row sets of different widths {sorted(width)}")
        self.dim = width.pop() if width else int(dim or (self.parts[0].shape[1] if self.parts else 0))
        self.dtype = np.dtype(self.parts[0].dtype if self.parts else dtype)
        self.starts = np.concatenate([[0], np.cumsum([p.shape[0] for p in self.parts])]).astype(np.int64)
        self.shape = (int(self.starts[-1]), self.dim)

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(self.shape[0])
            if step == 1:  # contiguous: one read per part it crosses
                out = [p[max(lo, s) - s : min(hi, e) - s] for p, s, e in zip(self.parts, self.starts[:-1], self.starts[1:])
                       if s < hi and e > lo]
                return np.concatenate(out) if out else np.zeros((0, self.dim), self.dtype)
        idx = _as_index(rows, self.shape[0])
        out = np.empty((idx.shape[0], self.dim), self.dtype)
        part = np.searchsorted(self.starts, idx, side="right") - 1
        for j in np.unique(part).tolist():
            sel = part == j
            out[sel] = self.parts[j][idx[sel] - self.starts[j]]
        return out


class PickedRows:
    """Rows ``index[i]`` of ``base`` as row ``i``."""

    def __init__(self, base: Any, index: np.ndarray):
        self.base, self.index = base, np.asarray(index, dtype=np.int64)
        self.shape = (int(self.index.shape[0]), int(base.shape[1]))
        self.dtype = base.dtype

    def __getitem__(self, rows: Any) -> np.ndarray:
        idx = self.index[rows]
        if idx.size and idx[-1] - idx[0] == idx.size - 1 and (idx.size < 2 or bool((np.diff(idx) == 1).all())):
            return self.base[int(idx[0]) : int(idx[-1]) + 1]  # a run of consecutive rows: one read
        return self.base[idx]


class JobRows:
    """The row of the job's matrix of each of a rank's rows (``rows[a:b]``, ``rows[int_array]``),
    computed from its segments (local ``(start, end)`` row ranges, shards in order) and their first
    job rows: 8 bytes a row never stored."""

    def __init__(self, segments: list[tuple[int, int]], firsts: list[int]):
        self.starts = np.array([s for s, _ in segments], dtype=np.int64)
        self.firsts = np.array(firsts, dtype=np.int64)
        self.shape = (int(segments[-1][1]) if segments else 0,)

    def __getitem__(self, rows: Any) -> np.ndarray:
        idx = _as_index(rows, self.shape[0])
        seg = np.searchsorted(self.starts, idx, side="right") - 1
        return self.firsts[seg] + idx - self.starts[seg] if idx.size else idx


class NpyColumn:
    """A 1-D ``.npy`` read on demand (``col[a:b]``; read with ``pread``, never mapped), for the
    per-row inputs a rank only ever reads chunk by chunk."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            self.head = f.tell()
        if len(shape) != 1:
            raise ValueError(f"{path}: expected a 1-D array, got shape {shape}")
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        if not isinstance(rows, slice) or rows.indices(self.shape[0])[2] != 1:
            return np.asarray(self)[rows]
        lo, hi, _ = rows.indices(self.shape[0])
        with open(self.path, "rb") as f:
            f.seek(self.head + lo * self.dtype.itemsize)
            return np.fromfile(f, self.dtype, max(0, hi - lo))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[0 : self.shape[0]]
        return a if dtype is None else a.astype(dtype)


def trim_heap() -> None:
    """Give the allocator's free pages back to the system (glibc ``malloc_trim``; a no-op elsewhere).
    glibc keeps freed arrays below its mmap threshold (up to 32 MiB) in the heap, so without it a
    step run in batches would grow its resident set with the number of batches."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
