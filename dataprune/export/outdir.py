"""The export's output directory: what in ``--out`` is ours, the staging directory an export is built
in, and publishing it so that nothing looks finished before it is.

``--out`` may hold files that other people (or other tools) put there, and anything in it — an
``index.json`` included — may have been written by someone else, so nothing in it is trusted:

* **Ours** is only what a record of ours lists and what is still exactly as recorded. A record is
  the ``written`` field of an ``index.json`` (or the ``records`` of an ``_INCOMPLETE`` marker) that
  says ``"by": "dataprune export"``; each entry is a plain name inside ``--out`` (or ``dir/file`` for
  a file put into a directory that was not ours) that matches the recording writer's
  :attr:`~.base.Writer.outputs`, and it counts only while it is, by ``lstat``, a regular file of the
  recorded size or a directory of regular files whose names and sizes hash to the recorded digest.
  Only such entries are ever removed, file by file (never ``rmtree`` of a directory we did not fully
  make); a symlink is never followed or replaced.
* **Foreign** is everything else: an export into a directory holding foreign files is refused
  unless ``--overwrite``, which writes beside them and replaces only files at the names it writes.
* **Internal**: the lock (``.dataprune.lock``), the marker and the staging directory (recognised
  by the stamp holding its own inode number, or by being empty).

The layout while an export runs, and the order of its steps (see also docs/architecture.md):
``_INCOMPLETE`` is written first (a JSON record of everything the export, or the earlier one it
replaces, may have left in ``--out``) and removed last; the writer builds everything inside
``OUT/.dataprune-export.tmp/``; publishing rewrites the marker with the new entries, renames each
top-level entry of the stage into ``--out``, renames ``index.json`` (holding the same record) in last,
and removes the marker and the stage. A kill at any moment leaves ``_INCOMPLETE`` or no final name
at all; the next export removes what the marker records and builds the same bytes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from typing import Any

from ..errors import ConfigError
from ..outlock import LOCK_NAME
from ..tables import load_json_file
from .base import INDEX, Writer, list_writers, writer_class
from .names import path_problem

STAGE = ".dataprune-export.tmp"  # the export is built here
STAMP = ".dataprune-stage"  # inside STAGE: {"by", "ino"} — the stage is ours
MARKER = "_INCOMPLETE"  # present while --out does not hold a finished export
BY = "dataprune export"
RECORD = "written"  # the record's field in index.json
INTERNAL = (LOCK_NAME, STAGE, MARKER, INDEX)
_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")


class OutDir:
    """One export's view of ``--out`` (used with the output lock held)."""

    def __init__(self, out: str, writer: type[Writer], prefix: str, overwrite: bool):
        self.out, self.writer, self.prefix, self.overwrite = out, writer, prefix, overwrite
        self.stage = os.path.join(out, STAGE)
        self.entries: list[dict[str, Any]] = []  # the record of what this export publishes
        self.index_ino: int | None = None  # the index.json this run renamed into place
        self.committed = False
        self.left: list[dict[str, Any]] = []  # records of an earlier export not yet removed
        self.made_stage = self.marked = False

    # ------------------------------------------------------------------------------- preparing

    def prepare(self) -> str:
        """Check ``--out``, remove the earlier export recorded there and make the stage; returns it."""
        view = _View(self.out)
        pats = _patterns(self.writer, self.prefix)
        foreign = []
        for name in sorted(os.listdir(self.out)):
            path = os.path.join(self.out, name)
            if name in view.ours:
                continue
            if os.path.islink(path) and (name in INTERNAL or any(p.fullmatch(name) for p in pats)):
                raise ConfigError(f"{path} is a symbolic link named like an output of this export; dataprune never writes "
                                  "through or over a link: remove it or choose another --out")
            if name == STAGE:
                raise ConfigError(f"{path} was not made by dataprune, which needs that name for its staging directory: "
                                  "move it away or choose another --out")
            foreign.append(name)
        if foreign and not self.overwrite:
            shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ConfigError(f"--out {self.out} holds files dataprune did not write ({shown}); choose an empty or new "
                              "directory, or pass --overwrite to export beside them (they are never deleted)")
        if STAGE in view.ours:
            _clear_stage(self.stage)
        os.mkdir(self.stage)
        self.made_stage = True
        fd = os.open(os.path.join(self.stage, STAMP), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump({"by": BY, "ino": os.lstat(self.stage).st_ino}, f)
        self.left = view.records
        self._mark()  # the earlier export's entries stay recorded until they are gone
        if INDEX in view.ours:
            os.unlink(os.path.join(self.out, INDEX))
        for r in self.left:
            for e in sorted(r["entries"], key=lambda e: e["name"].count("/"), reverse=True):
                _remove(os.path.join(self.out, e["name"]))
        self.left = []
        self._mark()
        return self.stage

    # ------------------------------------------------------------------------------ publishing

    def publish(self, index: dict[str, Any]) -> None:
        """Move the finished export from the stage into ``--out``; ``index`` gets the record and
        becomes ``index.json``, the last name to appear."""
        moves: list[tuple[str, dict[str, Any]]] = []
        pats = _patterns(self.writer, self.prefix)
        for name in sorted(os.listdir(self.stage)):
            if name == STAMP:
                continue
            src, dst = os.path.join(self.stage, name), os.path.join(self.out, name)
            if not (_plain({"name": name}) and "/" not in name and any(p.fullmatch(name) for p in pats)):
                raise ConfigError(f"{src}: the {self.writer.name!r} writer made a top-level name its `outputs` do not describe; "
                                  "not published (a later export could not tell it is ours)")
            sst, dst_st = os.lstat(src), _lstat(dst)
            if dst_st is not None and not self.overwrite:
                raise ConfigError(f"{dst} appeared while the export was being written; not replaced (pass --overwrite to replace it)")
            if dst_st is not None and stat.S_ISDIR(sst.st_mode) and stat.S_ISDIR(dst_st.st_mode):
                for child in sorted(os.listdir(src)):  # a directory that is not ours (--overwrite): merge into it
                    self._check_target(os.path.join(dst, child), os.path.join(src, child))
                    moves.append((f"{name}/{child}", _entry(f"{name}/{child}", os.path.join(src, child))))
                continue
            self._check_target(dst, src)
            moves.append((name, _entry(name, src)))
        self.entries = [e for _, e in moves]
        self._mark()
        for rel, _ in moves:
            os.replace(os.path.join(self.stage, rel), os.path.join(self.out, rel))
        index[RECORD] = self.record()
        tmp = os.path.join(self.stage, INDEX)
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
            self.index_ino = os.fstat(f.fileno()).st_ino
        os.replace(tmp, os.path.join(self.out, INDEX))
        self.committed = True
        os.unlink(os.path.join(self.out, MARKER))
        _clear_stage(self.stage)
        _fsync_dir(self.out)

    def record(self) -> dict[str, Any]:
        return {"by": BY, "format": self.writer.name, "prefix": self.prefix, "entries": self.entries}

    def _check_target(self, dst: str, src: str) -> None:
        st = _lstat(dst)
        if st is None:
            return
        if not self.overwrite:
            raise ConfigError(f"{dst} appeared while the export was being written; not replaced (pass --overwrite to replace it)")
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(f"{dst} is a symbolic link; dataprune never writes through or over a link")
        if stat.S_ISDIR(st.st_mode) or stat.S_ISDIR(os.lstat(src).st_mode):
            raise ConfigError(f"{dst}: already there as a {'directory' if stat.S_ISDIR(st.st_mode) else 'file'}, "
                              "and this export writes the other kind at that name; move it away or choose another --out")

    def abort(self) -> None:
        """After a failure (Ctrl-C and SIGTERM included): remove what was published and the stage;
        the marker goes last, and only when nothing it records is left."""
        if not self.committed:
            index = _lstat(os.path.join(self.out, INDEX))
            if index is not None and index.st_ino == self.index_ino:
                os.unlink(os.path.join(self.out, INDEX))
            for e in reversed(self.entries):  # what left the stage is in --out: ours to take back
                if not os.path.lexists(os.path.join(self.stage, e["name"])) and _same(self.out, e):
                    _remove(os.path.join(self.out, e["name"]))
            self.entries = []
        if self.made_stage:
            try:
                _clear_stage(self.stage)
            except OSError:
                pass
        marker = os.path.join(self.out, MARKER)
        if self.marked and not any(_is_ours(self.out, r, e) for r in self.left for e in r["entries"]):
            try:
                os.unlink(marker)
            except OSError:
                pass

    def _mark(self) -> None:
        """(Re)write ``_INCOMPLETE``: the records of every entry this export or the earlier one may leave."""
        records = self.left + ([self.record()] if self.entries else [])
        tmp = os.path.join(self.stage, MARKER)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"by": BY, "state": "an export is being written here; this directory is not a finished export",
                       "records": records}, f)
        os.replace(tmp, os.path.join(self.out, MARKER))
        self.marked = True


# ----------------------------------------------------------------------------------- records

class _View:
    """What in ``out`` is ours: ``ours`` (top-level names) and ``records`` (the earlier exports'
    records, each with only the entries still exactly as recorded)."""

    def __init__(self, out: str):
        self.ours: set[str] = {LOCK_NAME} if os.path.isfile(os.path.join(out, LOCK_NAME)) else set()
        self.records: list[dict[str, Any]] = []
        for name in (MARKER, INDEX):
            recs = _records(os.path.join(out, name), name)
            if recs is None:
                continue
            self.ours.add(name)
            for r in recs:
                entries = [e for e in r["entries"] if _is_ours(out, r, e)]
                self.ours |= {e["name"] for e in entries if "/" not in e["name"]}
                if entries:
                    self.records.append({**r, "entries": entries})
        if _stage_is_ours(os.path.join(out, STAGE)):
            self.ours.add(STAGE)


def _records(path: str, name: str) -> list[dict[str, Any]] | None:
    """The records a marker or index.json of ours holds; None when it is absent or not ours (not
    a regular file, not our JSON)."""
    st = _lstat(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        return None
    try:
        doc = load_json_file(path)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    recs = (doc.get("records") if doc.get("by") == BY else None) if name == MARKER else [doc.get(RECORD)]
    if not isinstance(recs, list) or not all(_valid_record(r) for r in recs):
        return None
    return recs


def _valid_record(r: Any) -> bool:
    return (isinstance(r, dict) and r.get("by") == BY and r.get("format") in list_writers() and isinstance(r.get("prefix"), str)
            and _PREFIX.fullmatch(r["prefix"]) is not None and isinstance(r.get("entries"), list))


def _is_ours(out: str, rec: dict[str, Any], e: Any) -> bool:
    """Is the record entry ``e`` a plain name inside ``out``, named like the recording writer's
    outputs, and still exactly what was recorded?"""
    if not (_plain(e) and any(p.fullmatch(e["name"].split("/")[0]) for p in _patterns(writer_class(rec["format"]), rec["prefix"]))):
        return False
    return _same(out, e)


def _plain(e: Any) -> bool:
    """A record entry naming ``name`` or ``dir/name`` inside --out (no '..', no absolute path, not ours internally)."""
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        return False
    parts = e["name"].split("/")
    return len(parts) <= 2 and path_problem(e["name"]) is None and not any(p in ("", ".") for p in parts) and parts[0] not in INTERNAL


def _same(out: str, e: dict[str, Any]) -> bool:
    """Is the entry, by ``lstat`` (never following a link), still the regular file of the recorded size
    or the directory of regular files with the recorded digest?"""
    st = _lstat(os.path.join(out, e["name"]))
    if st is None:
        return False
    if "digest" in e:  # (None: a directory holding more than regular files, never removed)
        return stat.S_ISDIR(st.st_mode) and isinstance(e["digest"], str) and _digest(os.path.join(out, e["name"])) == e["digest"]
    return stat.S_ISREG(st.st_mode) and isinstance(e.get("size"), int) and st.st_size == e["size"]


def _entry(name: str, path: str) -> dict[str, Any]:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return {"name": name, "digest": _digest(path)}
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: the export made something that is not a regular file or directory; not published")
    return {"name": name, "size": st.st_size}


def _digest(path: str) -> str | None:
    """sha256 of the names and sizes of a directory's entries, all regular files; None otherwise."""
    h = hashlib.sha256()
    with os.scandir(path) as it:
        items = sorted((d.name, d) for d in it)
    for name, d in items:
        if not d.is_file(follow_symlinks=False):
            return None
        h.update(f"{name}\0{d.stat(follow_symlinks=False).st_size}\n".encode("utf-8", "surrogateescape"))
    return f"{len(items)}:{h.hexdigest()}"


def _remove(path: str) -> None:
    """Remove one of our entries: a regular file, or a directory of regular files (never following a link)."""
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(path) as it:
            for d in list(it):
                if d.is_file(follow_symlinks=False):
                    os.unlink(d.path)
        os.rmdir(path)
    elif stat.S_ISREG(st.st_mode):
        os.unlink(path)


def _patterns(writer: type[Writer], prefix: str) -> list[re.Pattern]:
    return [re.compile(p.format(prefix=re.escape(prefix))) for p in writer.outputs]


def _stage_is_ours(stage: str) -> bool:
    st = _lstat(stage)
    if st is None or not stat.S_ISDIR(st.st_mode):
        return False
    try:
        doc = load_json_file(os.path.join(stage, STAMP))
        if isinstance(doc, dict) and doc.get("by") == BY and doc.get("ino") == st.st_ino:
            return True
    except (OSError, ValueError):
        pass
    return set(os.listdir(stage)) <= {STAMP}  # empty, or killed while writing its stamp


def _clear_stage(stage: str) -> None:
    """Remove our stage, its stamp last: stopped anywhere (a second signal during an abort, as
    torchrun sends when one rank dies), what is left is still recognisably ours for the next run."""
    if _lstat(stage) is None:
        return
    for root, dirs, files in os.walk(stage, topdown=False):
        for name in files:
            if not (root == stage and name == STAMP):
                _unlink(os.path.join(root, name))
        for name in dirs:
            p = os.path.join(root, name)
            if os.path.islink(p):
                _unlink(p)
            else:
                os.rmdir(p)
    _unlink(os.path.join(stage, STAMP))
    os.rmdir(stage)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def owned_names(out: str) -> set[str]:
    """Top-level names in ``out`` that the next export would treat as its own (for tests and tools)."""
    return _View(out).ours
