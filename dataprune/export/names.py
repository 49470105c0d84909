"""The one place that decides which names an export may write (tar members, folder entries, parquet
keys, ``keys.txt`` lines, class names).

Names come from data other people made (tar member names, folder file names, parquet key columns,
hand-edited manifests), so they are checked, never trusted, and never "repaired": a sample whose name
is unsafe is refused — a per-sample skip with reason ``unsafe_name`` under ``--on-error skip``, a
:class:`~dataprune.errors.SourceError` naming the sample under ``raise``. Every writer's output goes
through :func:`path_problem` (the vectorised WebDataset path is at least as strict: see
``fastpath._key_matrix``).
"""

from __future__ import annotations

import re

UNSAFE = "unsafe_name"  # the skip reason
MAX_COMPONENT = 255  # bytes of one path component (what common filesystems accept)

# C0 controls (NUL, tab, newline, ...), DEL, C1 controls, the Unicode line/paragraph separators
# (str.splitlines breaks lines there) and lone surrogates (undecodable file names; not UTF-8)
_BAD_CHAR = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def text_problem(text: object) -> str | None:
    """Why ``text`` cannot go into a line-based or UTF-8 output (None when it can)."""
    if not isinstance(text, str):
        return f"is not a string ({type(text).__name__})"
    m = _BAD_CHAR.search(text)
    if m is not None:
        c = m.group()
        what = "a tab" if c == "\t" else "a line break" if c in "\n\r\u2028\u2029" else "a NUL byte" if c == "\x00" \
            else "a byte that is not UTF-8" if "\ud800" <= c <= "\udfff" else "a control character"
        return f"contains {what} (U+{ord(c):04X})"
    return None


def path_problem(name: object) -> str | None:
    """Why ``name`` may not be written as a relative path inside the output (None when it may):
    empty, absolute (``/x``, ``C:x``), a backslash, a ``..`` component, a component over 255
    bytes, or any character :func:`text_problem` refuses."""
    why = text_problem(name)
    if why is not None:
        return why
    assert isinstance(name, str)
    if not name:
        return "is empty"
    if name[0] == "/":
        return "is absolute"
    if name[1:2] == ":":
        return "starts with a drive letter"
    if "\\" in name:
        return "contains a backslash"
    parts = name.split("/")
    if ".." in parts:
        return "has a '..' component"
    if any(len(p) > MAX_COMPONENT // 4 and len(p.encode()) > MAX_COMPONENT for p in parts):
        return f"has a component over {MAX_COMPONENT} bytes"
    return None


def sample_problem(shard: object, key: object, exts) -> tuple[str, str] | None:
    """The first unsafe name among what a writer would write for one sample — its key, each
    member name ``<key>.<ext>`` and its shard name (written to ``keys.txt`` and used to rename
    repeated keys) — as ``(name, why)``, or None."""
    why = path_problem(key)
    if why is not None:
        return repr(key), why
    for ext in exts:
        name = f"{key}.{ext}" if ext else key
        why = path_problem(name)
        if why is not None:
            return repr(name), why
    why = text_problem(shard)
    if why is not None:
        return f"shard name {shard!r}", why
    return None


def unsafe_message(shard: object, key: object, name: str, why: str) -> str:
    return f"{shard}: sample {key!r}: refused to write {name}: it {why}"
