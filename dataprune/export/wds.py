"""WebDataset writer: ``{prefix}-NNNNNN.tar`` shards, every member copied byte for byte under a
normalised header, and ``classes.txt``. Deterministic: same input, same bytes.

Exporting WebDataset manifest rows to WebDataset takes the vectorised route of :mod:`.fastpath`
(:meth:`WdsWriter.fast_path`), which writes exactly the bytes of :meth:`WdsWriter.add`.
"""

from __future__ import annotations

import os

import numpy as np

from .. import tario
from ..tables import atomic_write_bytes
from .base import Writer, register_writer
from .fastpath import _FastPath


@register_writer("wds")
class WdsWriter(Writer):
    """``{prefix}-NNNNNN.tar``: every member copied byte for byte under a normalised header. Shards
    stay under ``.tar.tmp`` names until :meth:`close` renames them all."""

    outputs = (r"{prefix}-\d{{6}}\.tar(\.tmp)?", r"classes\.txt")
    sharded = True

    def __init__(self, *a):
        super().__init__(*a)
        self.f = None
        self.n = self.size = 0

    def _open(self) -> None:
        name = f"{self.cfg.prefix}-{len(self.files):06d}.tar"
        self.writing = self._tmp(os.path.join(self.cfg.out, name))
        self.f = open(self.writing, "wb")
        self.files.append({"name": name, "samples": 0, "bytes": 0})
        self.n = self.size = 0
        self.keys = set()

    def _finish(self) -> None:
        if self.f is None:
            return
        tail = tario.end_of_archive(self.size)
        self.f.write(tail)
        self.size += len(tail)
        self.f.close()
        self.files[-1].update(samples=self.n, bytes=self.size)
        self.f = None

    def _fits(self, n: int, size: int, sample_bytes: int, shard: int | None = None) -> bool:
        """Does a sample of ``sample_bytes`` go into shard ``shard`` (default: the one being written),
        which already holds ``n`` samples in ``size`` bytes?"""
        if n >= self.shard_capacity(len(self.files) - 1 if shard is None else shard):
            return False
        mx = self.cfg.max_shard_bytes
        return not (mx and n and archive_size(size + sample_bytes) > mx)

    @staticmethod
    def _names(key: str, members) -> list[str]:
        return [f"{key}.{ext}" if ext else key for ext in members] or [key]

    @classmethod
    def _blob(cls, key: str, members: dict[str, bytes]) -> list[bytes]:
        blob = []
        for name, data in zip(cls._names(key, members), members.values()):
            blob.append(tario.member_header(name, len(data)))
            blob.append(data)
            blob.append(tario.padding(len(data)))
        return blob

    def add(self, shard, key, label, members, src_path) -> bool:
        head, _, base = key.rpartition("/")
        dotted = "." in base  # webdataset splits keys at the first dot of the basename
        if dotted:
            key = (head + "/" if head else "") + base.replace(".", "_")
        if self.refuse_unsafe(shard, key, *self._names(key, members)):
            return False
        blob = self._blob(key, members)
        sample_bytes = sum(len(b) for b in blob)
        new = self.f is None or not self._fits(self.n, self.size, sample_bytes)
        unique = key if new else self.unique_key(shard, key, peek=True)
        if unique != key:
            if self.refuse_unsafe(shard, key, *self._names(unique, members)):
                return False
            self.unique_key(shard, key)  # counts the rename
            blob = self._blob(unique, members)
            sample_bytes = sum(len(b) for b in blob)
            key = unique
        if dotted:
            self.stats.renamed_keys += 1
        if new:
            self._finish()
            self._open()
        self.f.writelines(blob)
        self.keys.add(key)
        self.n += 1
        self.size += sample_bytes
        return True

    def add_block(self, keys: list[str], sizes: np.ndarray, buf: np.ndarray) -> bool:
        """Fast path: ``buf`` holds finished tar blocks of ``len(keys)`` samples back to back (``sizes``
        bytes each), exactly as :meth:`add` would write them. Cuts shards where :meth:`add` would.
        Returns False, having written nothing, when a key would need renaming."""
        n = len(keys)
        pieces: list[tuple[int, int, bool]] = []  # (first, end, starts a new shard)
        cur_open, cur_n, cur_size = self.f is not None, self.n, self.size
        cur = len(self.files) - 1  # the shard being written (-1: none yet)
        if not self.cfg.max_shard_bytes:
            i = 0
            while i < n:
                new = not cur_open or cur_n >= self.shard_capacity(cur)
                if new:
                    cur_n, cur = 0, cur + 1
                take = min(self.shard_capacity(cur) - cur_n, n - i)
                pieces.append((i, i + take, new))
                cur_open, cur_n, i = True, cur_n + take, i + take
        else:
            first, new = 0, not cur_open
            for i, sb in enumerate(sizes.tolist()):
                if cur_open and self._fits(cur_n, cur_size, sb, cur):
                    cur_n, cur_size = cur_n + 1, cur_size + sb
                    continue
                if i > first:
                    pieces.append((first, i, new))
                first, new, cur_open, cur_n, cur_size, cur = i, True, True, 1, sb, cur + 1
            pieces.append((first, n, new))
        for a, b, new in pieces:
            ks = set(keys[a:b])
            if len(ks) != b - a or (not new and not ks.isdisjoint(self.keys)):
                return False
        ends = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        mv = memoryview(buf)
        for a, b, new in pieces:
            if b == a:
                continue
            if new:
                self._finish()
                self._open()
            self.f.write(mv[ends[a] : ends[b]])
            self.keys.update(keys[a:b])
            self.n += b - a
            self.size += ends[b] - ends[a]
        return True

    def fast_path(self, source, progress=None) -> _FastPath | None:
        """WebDataset -> WebDataset: whole chunks by blocks (:class:`.fastpath._FastPath`)."""
        return _FastPath(self, self.stats, progress, source) if source.format == "wds" else None

    def close(self) -> None:
        self._finish()
        for info in self.files:
            final = os.path.join(self.cfg.out, info["name"])
            os.replace(self._tmp(final), final)
        if self.classes:
            self.writing = os.path.join(self.cfg.out, "classes.txt")
            atomic_write_bytes(os.path.join(self.cfg.out, "classes.txt"), ("\n".join(self.classes) + "\n").encode())

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        for info in self.files:
            tmp = self._tmp(os.path.join(self.cfg.out, info["name"]))
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.files = []


def archive_size(body: int) -> int:
    """Bytes of a tar whose members take ``body`` bytes, end-of-archive blocks and record padding included."""
    total = body + 2 * tario.BLOCK  # two zero blocks, then zeros up to a whole record (tarwrite.end_of_archive)
    return total + (-total) % tario.RECORD
