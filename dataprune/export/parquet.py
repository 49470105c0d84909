"""Parquet writer: the Hugging Face ``datasets`` layout, ``train-NNNNN-of-NNNNN.parquet``.

Columns: ``key`` (unique in its file: a key already there becomes ``<input shard stem>/<key>``),
``image`` {bytes, path}, ``label`` (a ``ClassLabel`` when the classes are known) — what ``datasets``
reads — and the provenance a pruned set is joined back to score tables with: ``sample_id`` (uint64,
the id in the manifest and the score tables) and ``shard`` (the input shard, as the manifest names it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..sources.base import pick_image
from .base import Writer, register_writer


@register_writer("parquet")
class ParquetWriter(Writer):
    """Hugging Face ``datasets`` layout: ``key``, ``image`` {bytes, path}, ``label``, ``sample_id``, ``shard``."""

    ROW_GROUP = 256
    outputs = (r"train-\d{{5}}-of-\d{{5}}\.parquet", r"\.part-\d{{5}}\.parquet\.tmp")
    sharded = True

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
        self.tmp_files: list[str] = []

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

    def add(self, shard, key, label, members, src_path) -> bool:
        ext, data = pick_image(members)
        if data is None:
            self.stats.skip("no_image", f"{shard}: sample {key!r} has no image member", shard)
            return False
        new = self.w is None or self.n >= self.shard_capacity(len(self.files) - 1)
        unique = key if new else self.unique_key(shard, key, peek=True)
        if self.refuse_unsafe(shard, key, unique, f"{unique.rsplit('/', 1)[-1]}.{ext}"):
            return False
        if self.w is not None and new:
            self._finish()
        if self.w is None:
            tmp = os.path.join(self.cfg.out, f".part-{len(self.files):05d}.parquet.tmp")
            self.tmp_files.append(tmp)
            self.files.append({"name": None, "samples": 0})
            self.writing = tmp
            self.w = pq.ParquetWriter(tmp, self.schema, compression="none")
            self.n = 0
            self.keys = set()
        key = self.unique_key(shard, key)
        self.keys.add(key)
        self.rows.append((key, {"bytes": data, "path": f"{key.rsplit('/', 1)[-1]}.{ext}"}, label, self.sample_id, shard))
        self.n += 1
        if len(self.rows) >= self.ROW_GROUP:
            self._flush()
        return True

    def close(self) -> None:
        self._finish()
        total = len(self.tmp_files)
        for i, (tmp, info) in enumerate(zip(self.tmp_files, self.files)):
            name = f"train-{i:05d}-of-{total:05d}.parquet"
            info["name"] = name
            info["bytes"] = os.path.getsize(tmp)
            os.replace(tmp, os.path.join(self.cfg.out, name))

    def abort(self) -> None:
        if self.w is not None:
            self.w.close()
            self.w = None
        for tmp in self.tmp_files:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.files = []
