"""Parquet: the Hugging Face ``datasets`` layout (``image`` struct with ``bytes``, ``label`` int) and
plain byte columns. One file is one shard; it is streamed in record batches."""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from ..errors import ConfigError, SourceError
from ..ids import sample_id
from .base import Fetched, Sample, Shard, Source, common_root, relative_name, sniff_ext, unsafe_name

IMAGE_CANDIDATES = ("image", "img", "jpg", "png", "webp", "image_bytes", "bytes")
LABEL_CANDIDATES = ("label", "labels", "cls", "class")
KEY_CANDIDATES = ("key", "__key__", "id")
BATCH = 256


def _open(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file", reason="missing_file", path=path) from None
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{path}: not a readable parquet file ({e})", reason="bad_parquet", path=path) from None


class ParquetSource(Source):
    format = "parquet"

    def __init__(self, path: str, image_column: str | None = None, label_column: str | None = None,
                 key_column: str | None = None, **options):
        super().__init__(path, image_column=image_column, label_column=label_column, key_column=key_column, **options)
        self._cols: tuple[str, str | None, str | None] | None = None

    def _files(self) -> list[str]:
        if os.path.isdir(self.path):
            out = []
            for dirpath, dirnames, filenames in os.walk(self.path):
                dirnames.sort()
                out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".parquet"))
            return [os.path.abspath(p) for p in out]
        return [os.path.abspath(self.path)]  # locations must not depend on the working directory

    def list_shards(self) -> list[Shard]:
        files = self._files()
        if not files:
            raise SourceError(f"{self.path}: no .parquet files found", reason="no_shards", path=self.path)
        root = common_root(files)
        shards = []
        for i, p in enumerate(files):
            if not os.path.exists(p):
                raise SourceError(f"{p}: no such file", reason="missing_file", path=p)
            shards.append(Shard(index=i, name=relative_name(p, root), path=p, size=os.path.getsize(p)))
        # Columns come from the first readable file: one damaged file is that shard's error (reported
        # when it is read), not the whole dataset's.
        first_error = None
        for p in files:
            try:
                pf = _open(p)
            except SourceError as e:
                first_error = first_error or e
                continue
            self._columns(pf, p)
            break
        else:
            raise first_error  # type: ignore[misc]
        return shards

    def _columns(self, pf, path: str) -> tuple[str, str | None, str | None]:
        if self._cols is not None:
            return self._cols
        import pyarrow as pa

        names = pf.schema_arrow.names
        opts = self.options

        def choose(option: str, candidates, required: bool):
            given = opts.get(option)
            if given:
                if given not in names:
                    raise ConfigError(f"{path}: no column {given!r} (--{option.replace('_', '-')}); columns: {', '.join(names)}")
                return given
            for c in candidates:
                if c in names:
                    return c
            if option == "image_column":  # plain byte columns under another name: the only binary column
                binary = [f.name for f in pf.schema_arrow if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
                if len(binary) == 1:
                    return binary[0]
            if required:
                raise ConfigError(
                    f"{path}: no image column found (tried {', '.join(candidates)}); columns: {', '.join(names)}. Use --image-column"
                )
            return None

        self._cols = (choose("image_column", IMAGE_CANDIDATES, True), choose("label_column", LABEL_CANDIDATES, False),
                      choose("key_column", KEY_CANDIDATES, False))
        meta = pf.schema_arrow.metadata or {}
        if b"huggingface" in meta and self._cols[1]:
            try:
                feats = json.loads(meta[b"huggingface"])["info"]["features"]
                names_ = feats[self._cols[1]].get("names")
                if names_:
                    self.classes = list(names_)
            except (KeyError, ValueError, TypeError, AttributeError):
                pass
        return self._cols

    @staticmethod
    def _image_bytes(value) -> bytes | None:
        if isinstance(value, dict):
            value = value.get("bytes")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        return None

    def _batches(self, path: str, columns: list[str]):
        pf = _open(path)
        try:
            yield from pf.iter_batches(batch_size=BATCH, columns=columns)
        except (OSError, ValueError) as e:  # ArrowIOError, ArrowInvalid (damaged pages)
            raise SourceError(f"{path}: read failed ({e})", reason="bad_parquet", path=path) from None

    def iter_samples(self, shard: Shard) -> Iterator[Sample]:
        pf = _open(shard.path)
        img_col, label_col, key_col = self._columns(pf, shard.path)
        cols = [c for c in (img_col, label_col, key_col) if c]
        row = 0
        seen: set[str] = set()
        for batch in self._batches(shard.path, cols):
            d = batch.to_pydict()
            for i in range(batch.num_rows):
                key = str(d[key_col][i]) if key_col and d[key_col][i] is not None else f"{row:09d}"
                image = self._image_bytes(d[img_col][i])
                s = Sample(shard=shard.name, key=key, sample_id=sample_id(shard.name, key), label=None, image=image,
                           image_ext=sniff_ext(image) if image else None, loc_path=shard.path, loc_offset=row,
                           loc_size=len(image) if image else 0)
                where = f"{shard.path}: row {row} (key {key!r})"
                if unsafe_name(key):
                    s.status, s.error, s.image = "unsafe_name", f"{where}: unsafe key (absolute or '..')", None
                elif key in seen:
                    s.status, s.error, s.image = "duplicate_key", f"{where}: key appears twice in the file", None
                elif image is None:
                    s.status, s.error = "no_image", f"{where}: image column {img_col!r} holds no bytes"
                else:
                    seen.add(key)
                    if label_col:
                        value = d[label_col][i]
                        if value is not None:
                            try:
                                s.label = int(value)
                            except (TypeError, ValueError):
                                s.status, s.error = "bad_label", f"{where}: label {value!r} is not an integer"
                    s.members = {s.image_ext or "img": image}
                    if s.label is not None:
                        s.members["cls"] = str(s.label).encode()
                yield s
                row += 1

    def fetch(self, loc_path: str, rows: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        """Rows by number; only the row groups holding wanted rows are read (export fetches a file in
        many small calls, so reading from the first row each time would be quadratic)."""
        import bisect

        pf = _open(loc_path)
        img_col, label_col, _ = self._columns(pf, loc_path)
        cols = [c for c in (img_col, label_col) if c]
        md = pf.metadata
        starts = [0]
        for g in range(md.num_row_groups):
            starts.append(starts[-1] + md.row_group(g).num_rows)
        cached_group, table = -1, None
        last = -1
        for key, row, _size in rows:
            if row < last:
                raise SourceError(f"{loc_path}: rows must be sorted by offset", reason="internal")
            last = row
            if not 0 <= row < starts[-1]:
                raise SourceError(f"{loc_path}: row {row} (key {key!r}) is past the end of the file ({starts[-1]} rows); "
                                  "the file changed since it was listed", reason="stale_location", path=loc_path)
            g = bisect.bisect_right(starts, row) - 1
            if g != cached_group:
                try:
                    table = pf.read_row_group(g, columns=cols)
                except (OSError, ValueError) as e:  # ArrowIOError, ArrowInvalid
                    raise SourceError(f"{loc_path}: read failed in row group {g} ({e})", reason="bad_parquet",
                                      path=loc_path) from None
                cached_group = g
            i = row - starts[g]
            image = self._image_bytes(table.column(img_col)[i].as_py())
            if image is None:
                raise SourceError(f"{loc_path}: row {row} (key {key!r}) has no image bytes", reason="no_image", path=loc_path)
            members = {sniff_ext(image) or "img": image}
            if label_col:
                value = table.column(label_col)[i].as_py()
                if value is not None:
                    members["cls"] = str(int(value)).encode()
            yield Fetched(key, members)
