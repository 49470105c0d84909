"""JSON Lines writer: ``{prefix}-NNNNNN.jsonl``, one document a line.

A sample read from JSON Lines (member ``json``: its line as it was) is written byte for byte, then
``\\n``. Another text sample (member ``txt``: a WebDataset ``.txt``, a parquet text value) becomes
``{"id": key, "text": ...}``; a sample without a document (an image) ``{"id": key, "label": ...,
"members": {ext: base64}}``. A ``.json`` member that spans several lines is written compacted (its
content, not its bytes). Keys must be unique inside a file for the JSON Lines source to read it back:
a kept line whose id is already in the file being written starts the next file instead (its bytes
stay as they are).
"""

from __future__ import annotations

import base64
import json
import os

from ..sources.documents import document_text
from .base import Writer, register_writer


@register_writer("jsonl")
class JsonlWriter(Writer):
    """``{prefix}-NNNNNN.jsonl``: kept JSON lines unchanged, other text samples as ``{"id", "text"}``."""

    outputs = (r"{prefix}-\d{{6}}\.jsonl(\.tmp)?",)
    sharded = True

    def __init__(self, *a):
        super().__init__(*a)
        self.f = None
        self.n = self.size = 0

    def _open(self) -> None:
        name = f"{self.cfg.prefix}-{len(self.files):06d}.jsonl"
        self.writing = self._tmp(os.path.join(self.cfg.out, name))
        self.f = open(self.writing, "wb")
        self.files.append({"name": name, "samples": 0, "bytes": 0})
        self.n = self.size = 0
        self.keys = set()

    def _finish(self) -> None:
        if self.f is None:
            return
        self.f.close()
        self.files[-1].update(samples=self.n, bytes=self.size)
        self.f = None

    def _full(self, nbytes: int) -> bool:
        mx = self.cfg.max_shard_bytes
        return self.n >= self.shard_capacity(len(self.files) - 1) or bool(mx and self.n and self.size + nbytes > mx)

    def add(self, shard, key, label, members, src_path) -> bool:
        line = members.get("json")
        if line is not None and b"\n" not in line:
            out_key = key  # the line keeps its own id: a repeat goes to the next file
        else:
            if line is not None:  # a pretty-printed .json member: one line of the same content
                try:
                    line = json.dumps(json.loads(line), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                except (ValueError, RecursionError):
                    line = None
            if line is None:
                text = document_text(members)
                out_key = None if self.f is None else self.unique_key(shard, key, peek=True)
                out_key = out_key or key
                if self.refuse_unsafe(shard, key, text=(out_key,)):
                    return False
                doc = {"id": out_key, "text": text} if text is not None else {
                    "id": out_key, **({"label": label} if label is not None else {}),
                    "members": {ext: base64.b64encode(data).decode("ascii") for ext, data in members.items()}}
                line = json.dumps(doc, ensure_ascii=False).encode("utf-8")
                if out_key != key:
                    self.unique_key(shard, key)  # counts the rename
            else:
                out_key = key
        if self.f is None or self._full(len(line) + 1) or out_key in self.keys:
            self._finish()
            self._open()
        self.f.write(line)
        self.f.write(b"\n")
        self.keys.add(out_key)
        self.n += 1
        self.size += len(line) + 1
        return True

    def close(self) -> None:
        self._finish()
        for info in self.files:
            final = os.path.join(self.cfg.out, info["name"])
            os.replace(self._tmp(final), final)

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        for info in self.files:
            tmp = self._tmp(os.path.join(self.cfg.out, info["name"]))
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.files = []
