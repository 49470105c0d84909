"""Parquet: the Hugging Face ``datasets`` layout (``image`` struct with ``bytes``, ``label`` int) and
plain byte columns. One file is one shard; it is streamed in record batches.

Text corpora too: with ``--text-column`` (or, when no image column is found, a column named
``text``) each row's string is the sample's document (``Sample.text``; its UTF-8 bytes are the
sample's bytes, member ``txt``); a value that is not UTF-8 is ``bad_utf8``, a null ``no_text``."""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from ..errors import ConfigError, SourceError
from ..ids import sample_id
from .base import Fetched, FileTreeSource, Sample, Shard, file_shards, sniff_ext
from .guard import Refused, check_label, check_row, open_regular_fd, shown, unsafe_name

IMAGE_CANDIDATES = ("image", "img", "jpg", "png", "webp", "image_bytes", "bytes")
LABEL_CANDIDATES = ("label", "labels", "cls", "class")
KEY_CANDIDATES = ("key", "__key__", "id")
BATCH = 256


def _open(path: str):
    import pyarrow.parquet as pq

    try:
        fd, _, _ = open_regular_fd(path)  # never a FIFO or a device named *.parquet
    except Refused as e:
        if e.reason == "missing_file":
            raise SourceError(f"{path}: no such file", reason="missing_file", path=path) from None
        raise SourceError(f"{shown(path)}: {e.detail}", reason=e.reason, path=path) from None
    try:  # pyarrow opens the very file checked (its /proc link), with its own native reader
        via = f"/proc/self/fd/{fd}"
        pf = pq.ParquetFile(via if os.path.exists(via) else path)
        pf.schema_arrow  # noqa: B018  (decoded here: a column name that is not UTF-8 is this file's error)
        return pf
    except (ValueError, OSError) as e:  # ArrowInvalid, UnicodeDecodeError
        raise SourceError(f"{path}: not a readable parquet file ({str(e).replace(via, path)})", reason="bad_parquet",
                          path=path) from None
    finally:
        os.close(fd)


def _column(batch, name: str) -> list:
    """Python values of one column, never failing as a whole: strings are decoded value by value
    (undecodable ones become :data:`_BAD`), an image struct gives its ``bytes`` field only."""
    import pyarrow as pa

    col = batch.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    if pa.types.is_struct(t):
        if t.get_field_index("bytes") < 0:
            return [None] * len(col)
        col = col.field("bytes")
        t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        raw = col.view(pa.binary() if pa.types.is_string(t) else pa.large_binary()).to_pylist()
        return [_decode(v) for v in raw]
    return col.to_pylist()


_BAD = object()  # a string value that is not valid UTF-8


def _decode(v: bytes | None):
    if v is None:
        return None
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return _BAD


def _key_of(value) -> str | None:
    """A key column's value as a key, or None when it cannot be one (null, undecodable, bool, nested)."""
    if value is None or value is _BAD or isinstance(value, (bool, list, dict)):
        return None
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    return str(value)


class ParquetSource(FileTreeSource):
    format = "parquet"
    checks_locations = True

    def __init__(self, path: str, image_column: str | None = None, label_column: str | None = None,
                 key_column: str | None = None, text_column: str | None = None, **options):
        super().__init__(path, image_column=image_column, label_column=label_column, key_column=key_column,
                         text_column=text_column, **options)
        self.text = False  # a text corpus (decided from the first readable file's columns)
        self._cols: tuple[str, str | None, str | None] | None = None
        self._bad_groups: dict[tuple[str, int], str] = {}  # (file, row group) -> why it cannot be read

    @staticmethod
    def is_shard_name(name: str) -> bool:
        return name.endswith(".parquet")

    def list_shards(self) -> list[Shard]:
        files = self._files()
        shards = file_shards(files, ".parquet", self.path)
        # Columns come from the first readable file: one damaged file is that shard's error (reported
        # when it is read), not the whole dataset's.
        first_error = None
        for p in files:
            try:
                self._check_shard(p)
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
                raise ConfigError(f"{path}: no image column found (tried {', '.join(IMAGE_CANDIDATES)}) and no text column; "
                                  f"columns: {', '.join(names)}. Use --image-column, or --text-column for a text corpus")
            return None

        data = None if opts.get("text_column") else choose("image_column", IMAGE_CANDIDATES, "text" not in names)
        if data is None:  # a text corpus: --text-column, or a column named text
            data = choose("text_column", ("text",), True)
            self.text, self.modality = True, "text"
        self._cols = (data, choose("label_column", LABEL_CANDIDATES, False), choose("key_column", KEY_CANDIDATES, False))
        meta = pf.schema_arrow.metadata or {}
        if b"huggingface" in meta and self._cols[1]:
            try:
                feats = json.loads(meta[b"huggingface"])["info"]["features"]
                names_ = feats[self._cols[1]].get("names")
                if names_:
                    self.classes = list(names_)
            except (KeyError, ValueError, TypeError, AttributeError, RecursionError):
                pass
        return self._cols

    @staticmethod
    def _image_bytes(value) -> bytes | None:
        if isinstance(value, dict):
            value = value.get("bytes")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        return None

    def iter_samples(self, shard: Shard) -> Iterator[Sample]:
        """Row group by row group: a damaged one loses only its own rows, each counted
        (``bad_row_group``); the file is then reported (SourceError ``bad_parquet``) after the rows of
        every readable row group."""
        self._check_shard(shard.path)
        pf = _open(shard.path)
        img_col, label_col, key_col = self._columns(pf, shard.path)
        cols = [c for c in (img_col, label_col, key_col) if c]
        row = 0
        seen: set[str] = set()
        damaged: list[str] = []
        md = pf.metadata
        for g in range(md.num_row_groups):
            end = row + md.row_group(g).num_rows
            try:
                for batch in pf.iter_batches(batch_size=BATCH, row_groups=[g], columns=cols, use_threads=False):
                    values = [_column(batch, c) if c else None for c in (img_col, label_col, key_col)]
                    for i in range(batch.num_rows):
                        yield self._sample(shard, row, *(v[i] if v is not None else None for v in values),
                                           img_col=img_col, key_col=key_col, seen=seen)
                        row += 1
            except (OSError, ValueError, TypeError, IndexError) as e:  # ArrowIOError, ArrowInvalid: a damaged page
                damaged.append(f"row group {g} (rows {row}..{end - 1}): {e}")
                for r in range(row, end):
                    key = f"{r:09d}"
                    yield Sample(shard=shard.name, key=key, sample_id=sample_id(shard.name, key), label=None, image=None,
                                 image_ext=None, loc_path=shard.path, loc_offset=r, loc_size=0, status="bad_row_group",
                                 error=f"{shard.path}: row {r} (key {key!r}) is in an unreadable row group {g} ({e})")
            row = end
        if damaged:
            raise SourceError(f"{shard.path}: {len(damaged)} of {md.num_row_groups} row groups unreadable, their rows counted "
                              f"as bad_row_group; first: {damaged[0]}", reason="bad_parquet", path=shard.path)

    def _sample(self, shard: Shard, row: int, value, label, key_value, *, img_col, key_col, seen: set) -> Sample:
        key = _key_of(key_value) if key_col else f"{row:09d}"
        bad_key = key is None
        key = key if key is not None else f"{row:09d}"
        if self.text:
            if isinstance(value, (bytes, bytearray)):  # a binary column of UTF-8 text
                value = _decode(bytes(value))
            image = value.encode("utf-8") if isinstance(value, str) else None
        else:
            image = self._image_bytes(value)
        s = Sample(shard=shard.name, key=key, sample_id=sample_id(shard.name, key), label=None, image=image,
                   image_ext="txt" if self.text and image is not None else sniff_ext(image) if image else None, loc_path=shard.path,
                   loc_offset=row, loc_size=len(image) if image else 0)
        where = f"{shard.path}: row {row} (key {key!r})"
        if bad_key:
            s.status, s.error, s.image = "bad_key", f"{where}: key column {key_col!r} holds {_what(key_value)}, not a key", None
        elif unsafe_name(key):
            s.status, s.error, s.image = "unsafe_name", f"{where}: unsafe key (absolute or '..')", None
        elif key in seen:
            s.status, s.error, s.image = "duplicate_key", f"{where}: key appears twice in the file", None
        elif image is None and self.text:
            s.status = "bad_utf8" if value is _BAD else "no_text"
            s.error = f"{where}: text column {img_col!r} holds {_what(value)}, not a string"
        elif image is None:
            s.status, s.error = "no_image", f"{where}: image column {img_col!r} holds no bytes"
        else:
            seen.add(key)
            if label is not None:
                try:
                    s.label = check_label(label if label is not _BAD else b"\xff")
                except ValueError as e:
                    s.status, s.error, s.image = "bad_label", f"{where}: {e}", None
                    return s
            s.members = {s.image_ext or "img": image}
            s.text = value if self.text else None
            if s.label is not None:
                s.members["cls"] = str(s.label).encode()
        return s

    def fetch(self, loc_path: str, rows: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        """Rows by number; only the row groups holding wanted rows are read (export fetches a file in
        many small calls, so reading from the first row each time would be quadratic). A row number
        out of range, an unreadable row group or a bad label fails that row only."""
        import bisect

        self.check_location(loc_path)
        pf = _open(loc_path)
        img_col, label_col, _ = self._columns(pf, loc_path)
        cols = [c for c in (img_col, label_col) if c]
        md = pf.metadata
        starts = [0]
        for g in range(md.num_row_groups):
            starts.append(starts[-1] + md.row_group(g).num_rows)
        cached_group, table = -1, None
        last = -1
        for key, row, size in rows:
            check_row(loc_path, key, row, size)
            if row < last:
                raise SourceError(f"{loc_path}: rows must be sorted by offset", reason="internal")
            last = row
            if row >= starts[-1]:
                raise SourceError(f"{loc_path}: row {row} (key {key!r}) is past the end of the file ({starts[-1]} rows); "
                                  "the file changed since it was listed", reason="stale_location", path=loc_path)
            g = bisect.bisect_right(starts, row) - 1
            if g != cached_group:
                bad = self._bad_groups.get((loc_path, g))
                if bad is None:
                    try:
                        table = pf.read_row_group(g, columns=cols, use_threads=False)
                    except (OSError, ValueError, TypeError, IndexError) as e:  # ArrowIOError, ArrowInvalid
                        bad = self._bad_groups[(loc_path, g)] = str(e)
                if bad is not None:  # remembered: the driver fetches the rest again without this row
                    raise SourceError(f"{loc_path}: row {row} (key {key!r}) is in an unreadable row group {g} ({bad})",
                                      reason="bad_row_group", path=loc_path)
                cached_group = g
            one = table.slice(row - starts[g], 1)  # only the wanted row becomes Python objects
            value = _column(one, img_col)[0]
            if self.text and isinstance(value, (bytes, bytearray)):  # a binary column of UTF-8 text, as iter_samples reads it
                value = _decode(bytes(value))
            image = (value.encode("utf-8") if isinstance(value, str) else None) if self.text else self._image_bytes(value)
            if image is None:
                raise SourceError(f"{loc_path}: row {row} (key {key!r}) has no image bytes", reason="no_image", path=loc_path)
            if len(image) != size:
                raise SourceError(f"{loc_path}: row {row} (key {key!r}) holds {len(image)} image bytes, not the {size} of its "
                                  "location; the file changed since it was listed, or the location is wrong",
                                  reason="stale_location", path=loc_path)
            members = {"txt" if self.text else sniff_ext(image) or "img": image}
            label = _column(one, label_col)[0] if label_col else None
            if label is not None:
                try:
                    members["cls"] = str(check_label(label if label is not _BAD else b"\xff")).encode()
                except ValueError as e:
                    raise SourceError(f"{loc_path}: row {row} (key {key!r}): {e}", reason="bad_label", path=loc_path) from None
            yield Fetched(key, members)


def _what(value) -> str:
    return "null" if value is None else "an undecodable string" if value is _BAD else f"a {type(value).__name__}"
