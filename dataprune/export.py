"""Writers: WebDataset shards (raw member copy), parquet (Hugging Face layout), image folder, key list.

Every writer takes whole samples as ``(shard, key, label, members, src_path)`` and writes each output
file under a temporary name, renaming it into place only when complete; ``index.json`` is written
last, so an export without it is unfinished. Output is deterministic: same input, same bytes.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from . import tario
from .errors import ConfigError, DataPruneError, SourceError
from .ids import mix64
from .sources import Source, open_source, source_from_spec
from .sources.base import pick_image
from .tables import atomic_write_bytes, atomic_write_json, is_manifest, read_manifest

FORMATS = ("wds", "parquet", "folder", "list")
INDEX = "index.json"
CHUNK = 1024  # samples fetched per read batch (memory bound: CHUNK samples' bytes)


@dataclass(frozen=True)
class ExportConfig:
    to: str = "wds"
    out: str = "dataprune-out/export"
    shard_size: int = 10_000
    max_shard_bytes: int | None = None
    shuffle: bool = False
    seed: int = 0
    on_error: str = "skip"
    prefix: str = "pruned"

    def validate(self) -> None:
        if self.to not in FORMATS:
            raise ConfigError(f"--to must be one of {', '.join(FORMATS)}, not {self.to!r}")
        if self.shard_size < 1:
            raise ConfigError("--shard-size must be at least 1")
        if self.max_shard_bytes is not None and self.max_shard_bytes < 1024:
            raise ConfigError("--max-shard-bytes must be at least 1024")
        if self.on_error not in ("skip", "raise"):
            raise ConfigError("--on-error must be 'skip' or 'raise'")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix):
            raise ConfigError("--prefix may only contain letters, digits, '_', '-' and '.'")


@dataclass
class ExportStats:
    samples: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    renamed_keys: int = 0
    read_s: float = 0.0
    write_s: float = 0.0

    def skip(self, reason: str, message: str | None) -> None:
        self.skipped[reason] += 1
        if message and len(self.errors) < 100:
            self.errors.append(message)


# ------------------------------------------------------------------------------------------ writers

class Writer:
    def __init__(self, cfg: ExportConfig, classes: list[str] | None, stats: ExportStats):
        self.cfg, self.classes, self.stats = cfg, classes, stats
        self.files: list[dict[str, Any]] = []

    def add(self, shard: str, key: str, label: int | None, members: dict[str, bytes], src_path: str | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        pass

    def class_dir(self, label: int | None) -> str:
        if label is None:
            return ""
        name = self.classes[label] if self.classes and 0 <= label < len(self.classes) else str(label)
        name = name.replace("/", "_").replace("\\", "_").replace("\x00", "")
        return name if name not in ("", ".", "..") else f"class_{label}"

    def _tmp(self, final: str) -> str:
        return final + ".tmp"


class WdsWriter(Writer):
    def __init__(self, *a):
        super().__init__(*a)
        self.f = None
        self.n = self.size = 0

    def _open(self) -> None:
        name = f"{self.cfg.prefix}-{len(self.files):06d}.tar"
        self.final = os.path.join(self.cfg.out, name)
        self.f = open(self._tmp(self.final), "wb")
        self.files.append({"name": name, "samples": 0, "bytes": 0})
        self.n = self.size = 0

    def _finish(self) -> None:
        if self.f is None:
            return
        tail = tario.end_of_archive(self.size)
        self.f.write(tail)
        self.size += len(tail)
        self.f.close()
        os.replace(self._tmp(self.final), self.final)
        self.files[-1].update(samples=self.n, bytes=self.size)
        self.f = None

    def add(self, shard, key, label, members, src_path) -> None:
        head, _, base = key.rpartition("/")
        if "." in base:  # webdataset splits keys at the first dot of the basename
            key = (head + "/" if head else "") + base.replace(".", "_")
            self.stats.renamed_keys += 1
        blob = []
        for ext, data in members.items():
            blob.append(tario.member_header(f"{key}.{ext}", len(data)))
            blob.append(data)
            blob.append(tario.padding(len(data)))
        sample_bytes = sum(len(b) for b in blob)
        if self.f is not None and (
            self.n >= self.cfg.shard_size
            or (self.cfg.max_shard_bytes and self.n and self.size + sample_bytes + 2 * tario.BLOCK > self.cfg.max_shard_bytes)
        ):
            self._finish()
        if self.f is None:
            self._open()
        self.f.writelines(blob)
        self.n += 1
        self.size += sample_bytes

    def close(self) -> None:
        self._finish()
        if self.classes:
            atomic_write_bytes(os.path.join(self.cfg.out, "classes.txt"), ("\n".join(self.classes) + "\n").encode())

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
            os.unlink(self._tmp(self.final))
            self.files.pop()
            self.f = None


class ParquetWriter(Writer):
    """Hugging Face ``datasets`` layout: ``key``, ``image`` {bytes, path}, ``label``."""

    ROW_GROUP = 256

    def __init__(self, *a):
        super().__init__(*a)
        feats: dict[str, Any] = {"key": {"dtype": "string", "_type": "Value"}, "image": {"_type": "Image"}}
        feats["label"] = {"names": self.classes, "_type": "ClassLabel"} if self.classes else {"dtype": "int64", "_type": "Value"}
        self.schema = pa.schema(
            [("key", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
            metadata={b"huggingface": json.dumps({"info": {"features": feats}}).encode()},
        )
        self.w = None
        self.rows: list[tuple] = []
        self.n = 0
        self.tmp_files: list[str] = []

    def _flush(self) -> None:
        if not self.rows:
            return
        keys, images, labels = zip(*self.rows)
        self.w.write_table(pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array(images, self.schema.field("image").type),
                                                 pa.array(labels, pa.int64())], schema=self.schema))
        self.rows = []

    def _finish(self) -> None:
        if self.w is None:
            return
        self._flush()
        self.w.close()
        self.files[-1]["samples"] = self.n
        self.w = None

    def add(self, shard, key, label, members, src_path) -> None:
        ext, data = pick_image(members)
        if data is None:
            self.stats.skip("no_image", f"{shard}: sample {key!r} has no image member")
            return
        if self.w is not None and self.n >= self.cfg.shard_size:
            self._finish()
        if self.w is None:
            tmp = os.path.join(self.cfg.out, f".part-{len(self.files):05d}.parquet.tmp")
            self.tmp_files.append(tmp)
            self.files.append({"name": None, "samples": 0})
            self.w = pq.ParquetWriter(tmp, self.schema, compression="none")
            self.n = 0
        self.rows.append((key, {"bytes": data, "path": f"{key.rsplit('/', 1)[-1]}.{ext}"}, label))
        self.n += 1
        if len(self.rows) >= self.ROW_GROUP:
            self._flush()

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
        for tmp in self.tmp_files:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.files = []


class FolderWriter(Writer):
    """``<class>/<name>.<ext>``: hard links to the source files when possible, else copies."""

    def __init__(self, *a):
        super().__init__(*a)
        self.used: dict[str, set[str]] = {}
        self.links = self.copies = 0

    def add(self, shard, key, label, members, src_path) -> None:
        ext, data = pick_image(members)
        if data is None:
            self.stats.skip("no_image", f"{shard}: sample {key!r} has no image member")
            return
        cdir = self.class_dir(label)
        used = self.used.setdefault(cdir, set())
        name = key.rsplit("/", 1)[-1]
        if name in used:
            name = key.replace("/", "_")
        if name in used or name in ("", ".", ".."):
            name = f"{key.replace('/', '_')}-{len(used)}"
        used.add(name)
        d = os.path.join(self.cfg.out, cdir)
        os.makedirs(d, exist_ok=True)
        final = os.path.join(d, f"{name}.{ext}")
        tmp = self._tmp(final)
        if src_path is not None:
            try:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                os.link(src_path, tmp)
                os.replace(tmp, final)
                self.links += 1
                return
            except OSError:
                pass
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
        self.copies += 1

    def close(self) -> None:
        self.files = [{"name": c or ".", "samples": len(u)} for c, u in sorted(self.used.items())]

    @property
    def label_order_kept(self) -> bool:
        """ImageFolder numbers classes by sorted directory name; True if that equals our labels."""
        names = [self.class_dir(i) for i in range(len(self.classes or []))]
        return names == sorted(names)


class ListWriter(Writer):
    def __init__(self, *a):
        super().__init__(*a)
        self.final = os.path.join(self.cfg.out, "keys.txt")
        self.f = open(self._tmp(self.final), "w", encoding="utf-8")
        self.n = 0

    def add(self, shard, key, label, members, src_path) -> None:
        self.f.write(f"{shard}\t{key}\n")
        self.n += 1

    def close(self) -> None:
        self.f.close()
        os.replace(self._tmp(self.final), self.final)
        self.files = [{"name": "keys.txt", "samples": self.n}]

    def abort(self) -> None:
        self.f.close()
        os.unlink(self._tmp(self.final))


WRITERS: dict[str, type[Writer]] = {"wds": WdsWriter, "parquet": ParquetWriter, "folder": FolderWriter, "list": ListWriter}


# ------------------------------------------------------------------------------------------ driver

_OUTPUT_PATTERNS = (r"{prefix}-\d{{6}}\.tar(\.tmp)?", r"train-\d{{5}}-of-\d{{5}}\.parquet", r"\.part-\d{{5}}\.parquet\.tmp",
                    r"keys\.txt(\.tmp)?", r"classes\.txt", re.escape(INDEX))


def _prepare_out(cfg: ExportConfig, input_dirs: set[str]) -> None:
    out = os.path.realpath(cfg.out)
    for d in input_dirs:
        d = os.path.realpath(d)
        if out == d or out.startswith(d.rstrip(os.sep) + os.sep):
            raise ConfigError(f"--out {cfg.out} is inside the input data ({d}); choose a directory outside it")
    os.makedirs(cfg.out, exist_ok=True)
    pats = [re.compile(p.format(prefix=re.escape(cfg.prefix))) for p in _OUTPUT_PATTERNS]
    for name in os.listdir(cfg.out):  # results of an earlier or interrupted export: ours to replace
        if any(p.fullmatch(name) for p in pats):
            os.unlink(os.path.join(cfg.out, name))


def _input_dirs(source: Source, loc_paths) -> set[str]:
    if source.format == "folder":
        return {source.root}  # type: ignore[attr-defined]
    return {os.path.dirname(p) for p in loc_paths if "://" not in p}


def export(
    input_path: str,
    cfg: ExportConfig,
    *,
    format: str | None = None,
    source_options: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Export a manifest (or, when ``input_path`` is a dataset, the whole dataset)."""
    cfg.validate()
    if is_manifest(input_path):
        table, meta = read_manifest(input_path, ["sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size"])
        if not meta.get("source"):
            raise ConfigError(f"{input_path}: the manifest does not record its source dataset")
        source = source_from_spec(meta["source"])
        classes = meta.get("classes") or source.classes
        origin = {"manifest": os.path.abspath(input_path)}
    else:
        source = open_source(input_path, format, **(source_options or {}))
        shards = source.list_shards()
        table = None
        classes = source.classes
        origin = {"dataset": input_path}
    stats = ExportStats()
    t0 = time.perf_counter()
    if table is not None:
        loc_paths = table.column("loc_path").unique().to_pylist() if table.num_rows else []
        _prepare_out(cfg, _input_dirs(source, loc_paths))
    else:
        _prepare_out(cfg, _input_dirs(source, [s.path for s in shards]))
    writer = WRITERS[cfg.to](cfg, classes, stats)
    try:
        if table is None and not cfg.shuffle:
            _export_stream(source, shards, writer, stats, cfg, progress)
        else:
            if table is None:
                table = _listing(source, shards, stats, cfg)
            _export_rows(source, table, writer, stats, cfg, progress)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        source.close()
    index = {
        "format": cfg.to,
        "samples": stats.samples,
        "bytes": stats.bytes,
        "files": writer.files,
        "skipped": dict(stats.skipped),
        "errors": stats.errors,
        "renamed_keys": stats.renamed_keys,
        "classes": classes,
        "source": source.spec(),
        "shuffle": cfg.shuffle,
        "seed": cfg.seed if cfg.shuffle else None,
        "shard_size": cfg.shard_size,
        "max_shard_bytes": cfg.max_shard_bytes,
        **origin,
    }
    if isinstance(writer, FolderWriter):
        index["hard_links"], index["copies"] = writer.links, writer.copies
        index["label_order_kept"] = writer.label_order_kept
    atomic_write_json(os.path.join(cfg.out, INDEX), index)
    index["seconds"] = {"read": round(stats.read_s, 3), "write": round(stats.write_s, 3), "total": round(time.perf_counter() - t0, 3)}
    return index


def _handle(e: SourceError, stats: ExportStats, cfg: ExportConfig, count: int = 1) -> None:
    if cfg.on_error == "raise":
        raise e
    stats.skipped[e.reason] += count
    if len(stats.errors) < 100:
        stats.errors.append(str(e))


def _write(writer: Writer, stats: ExportStats, shard, key, label, members, src_path, progress) -> None:
    t = time.perf_counter()
    before = stats.skipped.total()
    writer.add(shard, key, label, members, src_path)
    stats.write_s += time.perf_counter() - t
    if stats.skipped.total() == before:
        stats.samples += 1
        stats.bytes += sum(len(v) for v in members.values())
    if progress:
        progress(1, sum(len(v) for v in members.values()))


def _export_stream(source: Source, shards, writer, stats, cfg, progress) -> None:
    """Whole dataset in source order: one sequential read of every shard."""
    for shard in shards:
        it = source.iter_samples(shard)
        while True:
            t = time.perf_counter()
            try:
                s = next(it)
            except StopIteration:
                break
            except SourceError as e:
                _handle(e, stats, cfg, count=0)
                break
            finally:
                stats.read_s += time.perf_counter() - t
            if not s.ok:
                if cfg.on_error == "raise":
                    raise SourceError(s.error or s.status, reason=s.status)
                stats.skip(s.status, s.error)
                continue
            _write(writer, stats, s.shard, s.key, s.label, s.members, s.loc_path if source.format == "folder" else None, progress)


def _listing(source: Source, shards, stats, cfg) -> pa.Table:
    from .tables import RowBuffer

    buf = RowBuffer()
    for shard in shards:
        try:
            for s in source.iter_samples(shard):
                if s.ok:
                    buf.add(s)
                elif cfg.on_error == "raise":
                    raise SourceError(s.error or s.status, reason=s.status)
                else:
                    stats.skip(s.status, s.error)
        except SourceError as e:
            _handle(e, stats, cfg, count=0)
    return buf.table()


def output_order(table: pa.Table, shuffle: bool, seed: int) -> list[int]:
    """Row order of the export: source order (shard, file, offset), or a seeded shuffle by sample_id."""
    import numpy as np
    import pyarrow.compute as pc

    if shuffle:
        return np.argsort(mix64(table.column("sample_id").to_numpy(), seed), kind="stable").tolist()
    keys = pa.table({
        "shard": pc.cast(table.column("shard"), pa.string()),
        "loc_path": pc.cast(table.column("loc_path"), pa.string()),
        "loc_offset": table.column("loc_offset"),
    })
    return pc.sort_indices(keys, sort_keys=[("shard", "ascending"), ("loc_path", "ascending"), ("loc_offset", "ascending")]).to_pylist()


def _export_rows(source: Source, table: pa.Table, writer, stats, cfg, progress) -> None:
    order = output_order(table, cfg.shuffle, cfg.seed)
    cols = {c: table.column(c) for c in ("shard", "key", "label", "loc_path", "loc_offset", "loc_size")}
    folder = source.format == "folder"
    for start in range(0, len(order), CHUNK):
        idx = order[start : start + CHUNK]
        take = pa.array(idx, pa.int64())
        rows = {c: col.take(take).to_pylist() for c, col in cols.items()}
        groups: dict[str, list[int]] = {}
        for j, p in enumerate(rows["loc_path"]):
            groups.setdefault(p, []).append(j)
        fetched: dict[int, dict[str, bytes]] = {}
        t = time.perf_counter()
        for path, js in groups.items():
            js.sort(key=lambda j: rows["loc_offset"][j])
            try:
                for j, item in zip(js, source.fetch(path, [(rows["key"][j], rows["loc_offset"][j], rows["loc_size"][j]) for j in js])):
                    fetched[j] = item.members
            except SourceError as e:
                missing = len(js) - sum(1 for j in js if j in fetched)
                _handle(e, stats, cfg, count=missing)
        stats.read_s += time.perf_counter() - t
        for j in range(len(idx)):
            if j in fetched:
                _write(writer, stats, rows["shard"][j], rows["key"][j], rows["label"][j], fetched[j],
                       rows["loc_path"][j] if folder else None, progress)


__all__ = ["ExportConfig", "export", "FORMATS", "DataPruneError"]
