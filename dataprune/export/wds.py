"""WebDataset writer: ``{prefix}-NNNNNN.tar`` shards, every member copied byte for byte under a
normalised header, and ``classes.txt``. Deterministic: same input, same bytes.

Exporting WebDataset manifest rows to WebDataset takes the vectorised route of :mod:`.fastpath`
(:meth:`WdsWriter.fast_path`), which writes exactly the bytes of :meth:`WdsWriter.add`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from .. import tario
from ..tables import atomic_write_bytes
from .base import Writer, register_writer
from .fastpath import _FastPath


@register_writer("wds")
class WdsWriter(Writer):
    """``{prefix}-NNNNNN.tar``: every member copied byte for byte under a normalised header. A file
    holds the rows of one output part (:attr:`~.base.Writer.part`; ``--max-shard-bytes`` may cut a
    part into several files), so processes can write parts side by side; files stay under hidden
    ``.tar.tmp`` names until :meth:`close` numbers them in part order."""

    outputs = (r"{prefix}-\d{{6}}\.tar(\.tmp)?", r"classes\.txt")
    sharded = True
    parallel = True

    def __init__(self, *a):
        super().__init__(*a)
        self.f = None
        self.n = self.size = 0

    def _open(self, part: int) -> None:
        last = self.files[-1] if self.files else None
        sub = last["sub"] + 1 if last is not None and last["part"] == part else 0
        tmp = f".{self.cfg.prefix}-{part:06d}-{sub:04d}.tar.tmp"
        self.writing = os.path.join(self.cfg.out, tmp)
        # recorded before it exists: a stop (KeyboardInterrupt) between the two would leave a file abort() does not know
        self.files.append({"part": part, "sub": sub, "tmp": tmp, "samples": 0, "bytes": 0})
        self.f = open(self.writing, "wb")
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

    def _new_file(self, part: int, n: int, size: int, sample_bytes: int, open_part: int | None) -> bool:
        """Does a sample of ``sample_bytes`` of ``part`` need a new file, the open one (of ``open_part``;
        None: no file is open) holding ``n`` samples in ``size`` bytes?"""
        if open_part != part or n >= self.shard_capacity(part):
            return True
        mx = self.cfg.max_shard_bytes
        return bool(mx and n and archive_size(size + sample_bytes) > mx)

    @property
    def _open_part(self) -> int | None:
        return self.files[-1]["part"] if self.f is not None else None

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
        new = self._new_file(self.part, self.n, self.size, sample_bytes, self._open_part)
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
            self._open(self.part)
        self.f.writelines(blob)
        self.keys.add(key)
        self.n += 1
        self.size += sample_bytes
        return True

    def add_block(self, keys: list[str], sizes: np.ndarray, parts: np.ndarray, emit: Callable[[Any, int, int], None]) -> bool:
        """Fast path: ``len(keys)`` samples of ``sizes`` bytes each (finished tar blocks, exactly as
        :meth:`add` would write them), of output parts ``parts``; ``emit(f, a, b)`` writes bytes
        ``[a, b)`` of the batch to the file object ``f``. Cuts files where :meth:`add` would.
        Returns False, having written nothing, when a key would need renaming."""
        n = len(keys)
        pieces: list[tuple[int, int, bool]] = []  # (first, end, starts a new file)
        open_part, cur_n, cur_size = self._open_part, self.n, self.size
        plist, slist = parts.tolist(), sizes.tolist()
        if not self.cfg.max_shard_bytes:
            bounds = [0, *(np.flatnonzero(np.diff(parts)) + 1).tolist(), n]
            for a, b in zip(bounds[:-1], bounds[1:]):
                p = plist[a]
                while a < b:
                    new = self._new_file(p, cur_n, 0, 0, open_part)
                    cur_n = 0 if new else cur_n
                    take = min(self.shard_capacity(p) - cur_n, b - a)
                    pieces.append((a, a + take, new))
                    open_part, cur_n, a = p, cur_n + take, a + take
        else:
            first, first_new = 0, True
            for i, (p, sb) in enumerate(zip(plist, slist)):
                if self._new_file(p, cur_n, cur_size, sb, open_part):
                    if i > first:
                        pieces.append((first, i, first_new))
                    first, first_new, open_part, cur_n, cur_size = i, True, p, 1, sb
                else:
                    first_new = first_new if i else False
                    cur_n, cur_size = cur_n + 1, cur_size + sb
            pieces.append((first, n, first_new))
        for a, b, new in pieces:
            ks = set(keys[a:b])
            if len(ks) != b - a or (not new and not ks.isdisjoint(self.keys)):
                return False
        ends = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        for a, b, new in pieces:
            if b == a:
                continue
            if new:
                self._finish()
                self._open(plist[a])
            emit(self.f, ends[a], ends[b])
            self.keys.update(keys[a:b])
            self.n += b - a
            self.size += ends[b] - ends[a]
        return True

    def fast_path(self, source, progress=None) -> _FastPath | None:
        """WebDataset -> WebDataset: whole chunks by blocks (:class:`.fastpath._FastPath`)."""
        return _FastPath(self, self.stats, progress, source) if source.format == "wds" else None

    def finish(self) -> None:
        self._finish()

    def close(self) -> None:
        self._finish()
        for k, info in enumerate(self.files):  # numbered in part order; a part that wrote nothing has no file
            final = os.path.join(self.cfg.out, f"{self.cfg.prefix}-{k:06d}.tar")
            self.writing = final
            os.replace(os.path.join(self.cfg.out, info["tmp"]), final)
            info["name"] = os.path.basename(final)
        self.files = [{"name": f["name"], "samples": f["samples"], "bytes": f["bytes"]} for f in self.files]
        if self.classes:
            self.writing = os.path.join(self.cfg.out, "classes.txt")
            atomic_write_bytes(os.path.join(self.cfg.out, "classes.txt"), ("\n".join(self.classes) + "\n").encode())

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        for info in self.files:
            tmp = os.path.join(self.cfg.out, info.get("tmp", ""))
            if info.get("tmp") and os.path.exists(tmp):
                os.unlink(tmp)
        self.files = []


def archive_size(body: int) -> int:
    """Bytes of a tar whose members take ``body`` bytes, end-of-archive blocks and record padding included."""
    total = body + 2 * tario.BLOCK  # two zero blocks, then zeros up to a whole record (tarwrite.end_of_archive)
    return total + (-total) % tario.RECORD
