"""Parquet writer: the Hugging Face ``datasets`` layout, ``train-NNNNN-of-NNNNN.parquet``.

Columns: ``key`` (unique in its file: a key already there becomes ``<input shard stem>/<key>``),
``image`` {bytes, path}, ``label`` (a ``ClassLabel`` when the classes are known) — what ``datasets``
reads — and the provenance a pruned set is joined back to score tables with: ``sample_id`` (uint64,
the id in the manifest and the score tables) and ``shard`` (the input shard, as the manifest names it).
Text samples (a first sample without an image but with a ``txt`` or ``.json`` text member) make a
text file instead: ``key``, ``text`` (the document's characters unchanged), ``sample_id``, ``shard``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..sources.base import pick_image
from ..sources.documents import document_text
from .base import Writer, register_writer


@register_writer("parquet")
class ParquetWriter(Writer):
    """Hugging Face ``datasets`` layout: ``key``, ``image`` {bytes, path}, ``label``, ``sample_id``, ``shard``."""

    ROW_GROUP = 256
    outputs = (r"train-\d{{5}}-of-\d{{5}}\.parquet", r"\.part-\d{{5,}}-\d+\.parquet\.tmp")
    sharded = True
    parallel = True  # a file holds one output part's rows (Writer.part): processes can write parts side by side

    def __init__(self, *a):
        super().__init__(*a)
        feats: dict[str, Any] = {"key": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}}
        feats["label"] = {"names": self.classes, "_type": "ClassLabel"} if self.classes else {"dtype": "int64", "_type": "Value"}
        feats["sample_id"] = {"dtype": "uint64", "_type": "Value"}
        feats["shard"] = {"dtype": "string", "_type": "Value"}
        self.schema = pa.schema(
            [("key", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64()),
             ("sample_id", pa.uint64()), ("shard", pa.string())],
            metadata={b"huggingface": json.dumps({"info": {"features": feats}}).encode()},
        )
        self.w = None
        self.rows: list[tuple] = []
        self.n = 0

    def _flush(self) -> None:
        if not self.rows:
            return
        cols = list(zip(*self.rows))
        self.w.write_table(pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(cols, self.schema)], schema=self.schema))
        self.rows = []

    def _finish(self) -> None:
        if self.w is None:
            return
        self._flush()
        self.w.close()
        self.files[-1]["samples"] = self.n
        self.w = None

    def _text_schema(self) -> None:
        feats = {"key": {"dtype": "string", "_type": "Value"}, "text": {"dtype": "string", "_type": "Value"},
                 "sample_id": {"dtype": "uint64", "_type": "Value"}, "shard": {"dtype": "string", "_type": "Value"}}
        self.schema = pa.schema([("key", pa.string()), ("text", pa.string()), ("sample_id", pa.uint64()), ("shard", pa.string())],
                                metadata={b"huggingface": json.dumps({"info": {"features": feats}}).encode()})
        self.text = True

    def add(self, shard, key, label, members, src_path) -> bool:
        ext, data = pick_image(members)
        mode = getattr(self, "text", None)  # None until the first sample decides
        doc = document_text(members) if mode or (mode is None and data is None) else None  # parsed once
        if mode is None and data is None and doc is not None and not self.files:
            self._text_schema()  # the first sample is a document: a text export
        self.text = getattr(self, "text", False)
        if self.text:
            data, ext = doc, "txt"
            if data is None:
                self.stats.skip("no_text", f"{shard}: sample {key!r} has no text member (.txt, or .json with a text field)", shard)
                return False
        if data is None:
            self.stats.skip("no_image", f"{shard}: sample {key!r} has no image member", shard)
            return False
        new = self.w is None or self.files[-1]["part"] != self.part or self.n >= self.shard_capacity(self.part)
        unique = key if new else self.unique_key(shard, key, peek=True)
        if self.refuse_unsafe(shard, key, unique, f"{unique.rsplit('/', 1)[-1]}.{ext}"):
            return False
        if self.w is not None and new:
            self._finish()
        if self.w is None:
            last = self.files[-1] if self.files else None
            sub = last["sub"] + 1 if last is not None and last["part"] == self.part else 0
            tmp = os.path.join(self.cfg.out, f".part-{self.part:05d}-{sub}.parquet.tmp")
            self.files.append({"name": None, "samples": 0, "part": self.part, "sub": sub, "tmp": os.path.basename(tmp)})
            self.writing = tmp
            self.w = pq.ParquetWriter(tmp, self.schema, compression="none")
            self.n = 0
            self.keys = set()
        key = self.unique_key(shard, key)
        self.keys.add(key)
        self.rows.append((key, data, self.sample_id, shard) if self.text else
                         (key, {"bytes": data, "path": f"{key.rsplit('/', 1)[-1]}.{ext}"}, label, self.sample_id, shard))
        self.n += 1
        if len(self.rows) >= self.ROW_GROUP:
            self._flush()
        return True

    def finish(self) -> None:
        self._finish()
        for info in self.files:
            info["bytes"] = os.path.getsize(os.path.join(self.cfg.out, info["tmp"]))

    def close(self) -> None:
        self.finish()
        total = len(self.files)  # numbered in part order; a part that wrote nothing has no file
        for i, info in enumerate(self.files):
            name = f"train-{i:05d}-of-{total:05d}.parquet"
            info["name"] = name
            os.replace(os.path.join(self.cfg.out, info["tmp"]), os.path.join(self.cfg.out, name))
        self.files = [{"name": f["name"], "samples": f["samples"], "bytes": f["bytes"]} for f in self.files]

    def abort(self) -> None:
        if self.w is not None:
            self.w.close()
            self.w = None
        for info in self.files:
            tmp = os.path.join(self.cfg.out, info.get("tmp") or "")
            if info.get("tmp") and os.path.exists(tmp):
                os.unlink(tmp)
        self.files = []
