"""What a text sample's document is, one rule for every source (JSON Lines, parquet, WebDataset) and
for the writers that export documents."""

from __future__ import annotations

import json

from .base import Sample

DEFAULT_TEXT_COLUMN = "text"


def text_of(s: Sample, column: str = DEFAULT_TEXT_COLUMN) -> tuple[str | None, str | None, str | None]:
    """The document of a sample of any source: ``(text, reason, message)``. The text sources set
    ``Sample.text``; a WebDataset sample without an image (status ``no_image``) has its ``.txt``
    member (UTF-8) or the ``column`` field of its ``.json`` member."""
    if s.text is not None:
        return s.text, None, None
    if s.status not in ("ok", "no_image"):
        return None, s.status, s.error
    return member_text(s.members, column, f"{s.loc_path}: sample {s.key!r}")


def member_text(members: dict[str, bytes], column: str, where: str) -> tuple[str | None, str | None, str | None]:
    """(text, None, None) from a sample's ``txt`` member, else its ``json`` member's field ``column``;
    else (None, reason, message naming ``where``)."""
    if "txt" in members:
        try:
            return members["txt"].decode("utf-8"), None, None
        except UnicodeDecodeError as e:
            return None, "bad_utf8", f"{where}: the .txt member is not valid UTF-8 (byte {e.start})"
    if "json" in members:
        doc, why = _object(members["json"])
        if doc is None:
            return None, "bad_json", f"{where}: the .json member {why}"
        v = doc.get(column)
        if isinstance(v, str) and not is_unicode(v):
            return None, "bad_utf8", f"{where}: the .json member's field {column!r} holds a lone surrogate (\\u escape)"
        if isinstance(v, str):
            return v, None, None
        return None, "no_text", f"{where}: the .json member has no string field {column!r}"
    return None, "no_text", f"{where}: no .txt member and no .json member (has: {', '.join(sorted(members)) or 'nothing'})"


def document_text(members: dict[str, bytes], column: str = DEFAULT_TEXT_COLUMN) -> str | None:
    """The document among exported members (a writer's view): :func:`member_text`'s text, or None."""
    return member_text(members, column, "")[0]


def is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate (a JSON ``\\ud800`` escape): not text anything can hash or write."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _object(data: bytes) -> tuple[dict | None, str | None]:
    try:  # strict UTF-8 (json.loads would take encoded surrogates, and UTF-16/32); a leading BOM is dropped
        data = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, f"is not valid UTF-8 (byte {e.start})"
    try:
        doc = json.loads(data)
    except RecursionError:
        return None, "is nested too deeply"
    except ValueError as e:
        return None, f"is not valid JSON ({e})"
    if not isinstance(doc, dict):
        return None, f"is a JSON {type(doc).__name__}, not an object"
    return doc, None
