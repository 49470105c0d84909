"""Key-list writer: ``keys.txt``, one ``<shard>\\t<key>`` line per kept sample."""

from __future__ import annotations

import os

from .base import Writer, register_writer


@register_writer("list")
class ListWriter(Writer):
    outputs = (r"keys\.txt(\.tmp)?",)

    def __init__(self, *a):
        super().__init__(*a)
        self.final = os.path.join(self.cfg.out, "keys.txt")
        self.writing = self._tmp(self.final)
        self.f = open(self.writing, "w", encoding="utf-8")
        self.n = 0

    def add(self, shard, key, label, members, src_path) -> bool:
        if self.refuse_unsafe(shard, key, key, text=(shard,)):  # keys.txt is line-based
            return False
        self.f.write(f"{shard}\t{key}\n")
        self.n += 1
        return True

    def close(self) -> None:
        self.f.close()
        os.replace(self._tmp(self.final), self.final)
        self.files = [{"name": "keys.txt", "samples": self.n}]

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self._tmp(self.final)):
            os.unlink(self._tmp(self.final))
