"""JSON Lines text corpora (``.jsonl``, ``.jsonl.gz``, ``.json.gz``), and the one rule every text
source shares for what a sample's document is (:func:`text_of`).

One file is one shard; one non-blank line is one sample (blank lines are not documents and are
passed over). The document is the line's ``--text-column`` field (default ``text``), its key the
``--key-column`` field (default ``id``) or, without one, its line number (``000000007`` = line 7).
A sample's bytes (``image``, the member ``json``) are the line exactly as it is in the file, without
its ``\\n``, so an export copies it unchanged; its location is the file, the byte offset of the line
(in the decompressed stream for ``.gz``) and the line's length.

Bad lines are counted skips naming file and line: ``bad_utf8`` (not UTF-8), ``bad_json`` (not one
JSON object), ``no_text`` (the text field is missing or not a string), ``bad_key``/``unsafe_name``/
``duplicate_key`` (the key field), ``too_large`` (a line above :data:`MAX_LINE`). A damaged gzip
stream is the shard's SourceError, after the lines before the damage.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Iterable, Iterator

from ..errors import SourceError
from ..ids import sample_id
from .base import Fetched, FileTreeSource, Sample, Shard, file_shards
from .documents import DEFAULT_TEXT_COLUMN, _object, is_unicode
from .guard import Refused, check_row, escape_name, open_regular, shown, unsafe_name

TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
DEFAULT_KEY_COLUMN = "id"
MAX_LINE = 64 << 20  # a longer line is a too_large skip (it is read past, never held whole)


def is_text_name(path: str) -> bool:
    return path.lower().endswith(TEXT_SUFFIXES)


def _lines(f, path: str) -> Iterator[tuple[int, int, bytes | None]]:
    """``(line number, byte offset, line bytes without its newline or None when too long)``."""
    off, n = 0, 0
    while True:
        line = f.readline(MAX_LINE + 1)
        if not line:
            return
        n += 1
        start = off
        if len(line) > MAX_LINE and not line.endswith(b"\n"):  # read past the rest of the line
            off += len(line)
            while line and not line.endswith(b"\n"):
                line = f.readline(1 << 20)
                off += len(line)
            yield n, start, None
            continue
        off += len(line)
        yield n, start, line[:-1] if line.endswith(b"\n") else line


class JsonlSource(FileTreeSource):
    format = "jsonl"
    modality = "text"
    checks_locations = True

    def __init__(self, path: str, text_column: str | None = None, key_column: str | None = None, **options):
        super().__init__(path, text_column=text_column, key_column=key_column, **options)
        self.text_column = text_column or DEFAULT_TEXT_COLUMN
        self.key_column = key_column or DEFAULT_KEY_COLUMN

    is_shard_name = staticmethod(is_text_name)

    def list_shards(self) -> list[Shard]:
        return file_shards(self._files(), ".jsonl, .jsonl.gz or .json.gz", self.path)

    def _open(self, path: str):
        self._check_shard(path)
        try:
            raw = open_regular(path)
        except Refused as e:
            raise SourceError(f"{shown(path)}: {e.detail}" if e.reason != "missing_file" else f"{path}: no such file",
                              reason=e.reason, path=path) from None
        return gzip.GzipFile(fileobj=raw, mode="rb") if path.lower().endswith(".gz") else raw

    def iter_samples(self, shard: Shard) -> Iterator[Sample]:
        seen: set[str] = set()
        n = 0
        with self._open(shard.path) as f:
            try:
                for n, off, line in _lines(f, shard.path):
                    if line is not None and not line.strip():
                        continue  # a blank line is not a document
                    yield self._sample(shard, n, off, line, seen)
            except (OSError, EOFError, zlib.error, ValueError) as e:  # a damaged or cut gzip stream
                reason = "truncated_file" if isinstance(e, EOFError) else "unreadable_shard"
                raise SourceError(f"{shard.path}: read failed after line {n}: {e}", reason=reason, path=shard.path) from None

    def _sample(self, shard: Shard, n: int, off: int, line: bytes | None, seen: set) -> Sample:
        key = f"{n:09d}"
        s = Sample(shard=shard.name, key=key, sample_id=0, label=None, image=None, image_ext=None, loc_path=shard.path,
                   loc_offset=off, loc_size=len(line) if line is not None else 0)
        where = f"{shard.path}: line {n} (key {key!r})"
        if line is None:
            s.status, s.error = "too_large", f"{where}: longer than {MAX_LINE} bytes"
        else:
            doc, why = _object(line)
            if doc is None:
                s.status = "bad_utf8" if why.startswith("is not valid UTF-8") else "bad_json"
                s.error = f"{where}: the line {why}"
            else:
                kv = doc.get(self.key_column)
                if kv is not None:
                    if isinstance(kv, (bool, list, dict, float)):
                        s.status, s.error = "bad_key", f"{where}: key field {self.key_column!r} holds a {type(kv).__name__}, not a key"
                    else:
                        s.key = str(kv)
                text = doc.get(self.text_column)
                if s.ok and unsafe_name(s.key):
                    s.status, s.error = "unsafe_name", f"{shard.path}: line {n}: unsafe key {shown(s.key)} (absolute, '..' or empty)"
                elif s.ok and s.key in seen:
                    s.status, s.error = "duplicate_key", f"{shard.path}: line {n}: key {s.key!r} appears twice in the file"
                elif s.ok and not isinstance(text, str):
                    s.status = "no_text"
                    s.error = f"{shard.path}: line {n} (key {s.key!r}): no string field {self.text_column!r} (--text-column)"
                elif s.ok and not is_unicode(text):
                    s.status = "bad_utf8"
                    s.error = f"{shard.path}: line {n} (key {s.key!r}): field {self.text_column!r} holds a lone surrogate (\\u escape)"
                elif s.ok:
                    seen.add(s.key)
                    s.text, s.image, s.image_ext, s.members = text, line, "json", {"json": line}
        s.key = escape_name(s.key)
        s.sample_id = sample_id(shard.name, s.key)
        return s

    def fetch(self, loc_path: str, rows: Iterable[tuple[str, int, int]]) -> Iterator[Fetched]:
        """Each row's bytes must be one whole line of the file (a newline, or the start of the file,
        before it; a newline or the end after it) holding one JSON object."""
        self.check_location(loc_path)
        seekable = not loc_path.lower().endswith(".gz")
        with self._open(loc_path) as f:
            pos, last = 0, b""  # (a .gz stream: where it stands, and the byte before that)
            for key, offset, size in rows:
                check_row(loc_path, key, offset, size)
                where = f"{shown(loc_path)}: sample {key!r} at byte {offset}"
                try:
                    if seekable:
                        f.seek(max(0, offset - 1))
                        before = f.read(1) if offset else b""
                    elif offset < pos:
                        raise SourceError(f"{loc_path}: rows must be sorted by offset", reason="internal")
                    else:
                        left = offset - pos - 1
                        while left > 0:
                            chunk = f.read(min(left, 1 << 20))
                            if not chunk:
                                break
                            left -= len(chunk)
                        before = last if offset == pos else f.read(1)
                    data = f.read(size + 1)
                except (OSError, EOFError, zlib.error) as e:
                    raise SourceError(f"{where}: read failed ({e}); the file changed since it was listed",
                                      reason="unreadable_shard", path=loc_path) from None
                pos, last = offset + len(data), data[-1:] or last
                line, after = data[:size], data[size:]
                if len(line) != size or (offset and before != b"\n") or after not in (b"", b"\n") or b"\n" in line:
                    raise SourceError(f"{where}: the {size} bytes there are not one whole line; the file changed since it "
                                      "was listed, or the location is wrong", reason="stale_location", path=loc_path)
                doc = _object(line)[0]
                if doc is None:
                    raise SourceError(f"{where}: the line there is not a JSON object; the file changed since it was listed",
                                      reason="stale_location", path=loc_path)
                kv = doc.get(self.key_column)
                if isinstance(kv, (str, int)) and not isinstance(kv, bool) and escape_name(str(kv)) != key:
                    raise SourceError(f"{where}: the line there has key {shown(str(kv))}; the file changed since it was "
                                      "listed", reason="stale_location", path=loc_path)
                yield Fetched(key, {"json": line})
