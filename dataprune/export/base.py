"""The writer contract, the writer registry and the export's counters.

A writer takes whole samples as ``(shard, key, label, members, src_path)``. The driver
(``export.run``) hands every writer a configuration whose ``out`` is a staging directory inside
``--out`` and publishes what the writer leaves there when the export is complete (``export.outdir``),
so a writer only needs to write its files and describe them: it still writes under temporary names
and gives its files their final names in :meth:`Writer.close` (a writer used on its own then never
leaves a file that looks finished), and :meth:`Writer.abort` removes everything it wrote. The driver
knows writers only through this class: the top-level names its exports leave (:attr:`Writer.outputs`,
checked before an earlier export's files are removed), what it adds to ``index.json``
(:meth:`Writer.index_fields`) and whether it has a faster route for a source (:meth:`Writer.fast_path`).
Every name a writer writes goes through :mod:`.names` (:meth:`Writer.refuse_unsafe`). A writer with
:attr:`Writer.parallel` starts a file only at the output part of each sample (:attr:`Writer.part`), so
``--jobs``/torchrun processes can each write some parts (:meth:`Writer.finish`) and one of them
:meth:`Writer.adopt` s them all before :meth:`Writer.close`; other writers run in one process.

A writer module registers its class with :func:`register_writer`; ``--to`` names a registered writer.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import pyarrow as pa

from ..config import WRITER_ALIASES, ExportConfig
from ..errors import OnError, SourceError
from ..registry import Registry
from ..sources import Source
from .names import UNSAFE, path_problem, text_problem, unsafe_message

INDEX = "index.json"
MAX_ERRORS = 100  # messages kept in index.json's ``errors``
CLASSES_FILE = "classes.txt"  # one class name a line, line i = label i (what the wds source reads beside shards)
_RESERVED = {n.casefold() for n in (INDEX, CLASSES_FILE, "_INCOMPLETE")}  # top-level names a class directory must not take


@dataclass
class ExportStats:
    samples: int = 0
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    renamed_keys: int = 0
    read_s: float = 0.0
    write_s: float = 0.0
    shard_errors: list[dict[str, Any]] = field(default_factory=list)  # damaged input shards
    per_shard: dict[str, Counter] = field(default_factory=dict)  # input shard -> seen / kept / skipped
    at: float = -1.0  # the position (in the export's row order) being written: messages are ordered by it
    error_at: list[float] = field(default_factory=list)  # (a skip before position p: p - 0.5; before any row: -1)

    def shard(self, name: str) -> Counter:
        c = self.per_shard.get(name)
        if c is None:
            c = self.per_shard[name] = Counter(seen=0, kept=0, skipped=0)
        return c

    def skip(self, reason: str, message: str | None, shard: str | None = None) -> None:
        self.skipped[reason] += 1
        if shard is not None:
            self.shard(shard)["skipped"] += 1
        if message and len(self.errors) < MAX_ERRORS:  # a process writes its rows in order: later ones never
            self.errors.append(message)  # come before the ones it already holds (see merge)
            self.error_at.append(self.at)

    def merge(self, other: "ExportStats") -> None:
        """Add another process's counts (its rows are disjoint from ours). The messages end up in
        row order, the first MAX_ERRORS of them: the same list whichever process wrote which part."""
        self.samples += other.samples
        self.bytes += other.bytes
        self.skipped.update(other.skipped)
        self.renamed_keys += other.renamed_keys
        self.read_s += other.read_s
        self.write_s += other.write_s
        self.shard_errors += other.shard_errors
        for name, c in other.per_shard.items():
            self.shard(name).update(c)
        pairs = sorted(zip(self.error_at + other.error_at, self.errors + other.errors), key=lambda p: p[0])[:MAX_ERRORS]
        self.error_at, self.errors = [p for p, _ in pairs], [m for _, m in pairs]

    def shard_error(self, shard: str, e: SourceError) -> None:
        self.shard_errors.append({"shard": shard, "reason": e.reason, "error": str(e)})


class FastPath(Protocol):
    """A writer's faster route for whole chunks of manifest rows (see :meth:`Writer.fast_path`)."""

    chunk_rows: int  # rows the driver hands over per call of :meth:`run`

    def run(self, sub: pa.Table, slow: Callable[[pa.Table], None]) -> None:
        """Export ``sub`` (rows in output order), handing the rows it cannot take to ``slow``."""

    def close(self) -> None: ...


_KEY_SUFFIXES = re.compile(r"\.(tar|tar\.gz|tgz|parquet)$")


class Writer:
    """Base class of the writers; a subclass implements :meth:`add`, :meth:`close` and :meth:`abort`."""

    name = ""  # the ``--to`` name, set by :func:`register_writer`
    outputs: tuple[str, ...] = ()  # regexes (``{prefix}`` = the shard prefix) of the top-level names its exports leave
    sharded = False  # cuts its output into files of :meth:`shard_capacity` samples (the driver notes few shards)
    sample_id: int | None = None  # the id of the sample being added: set by the driver before each add (else None)
    part: int = 0  # the output shard of the sample being added (plan_parts): set by the driver before each add
    parallel = False  # True: cuts its files at ``part`` boundaries only, so processes can write the parts
    # i ≡ k (mod N) each and :meth:`adopt` + :meth:`close` in one of them finishes the export (--jobs, torchrun)

    def __init__(self, cfg: ExportConfig, classes: list[str] | None, stats: ExportStats):
        self.cfg, self.classes, self.stats = cfg, classes, stats
        self._plan = cfg.shard_plan(0)  # (q, r): until the driver says how many samples come (expect)
        self.on_error = OnError(cfg.on_error)
        self.files: list[dict[str, Any]] = []
        self.keys: set[str] = set()  # keys in the current output file
        self.writing: str | None = None  # the file being written (named in a disk-full or I/O error)
        self._dirs: list[str] | None = None  # class directories, made on first use (class_dir)

    def expect(self, n: int) -> None:
        """The driver's count of the samples to come (before the first :meth:`add`): with no explicit
        ``--shard-size`` it sets the shard sizes (``ExportConfig.shard_plan``)."""
        self._plan = self.cfg.shard_plan(n)

    @property
    def plan(self) -> tuple[int, int]:
        """``(q, r)`` of ``ExportConfig.shard_plan`` for the expected count."""
        return self._plan

    def shard_capacity(self, i: int) -> int:
        """The most samples output shard ``i`` (0-based) holds."""
        q, r = self._plan
        return q + (i < r)

    @property
    def max_shard_samples(self) -> int:
        """The most samples any shard holds (``index.json``'s ``shard_size``)."""
        return self.shard_capacity(0)

    def add(self, shard: str, key: str, label: int | None, members: dict[str, bytes], src_path: str | None) -> bool | None:
        """Write one sample; return False when it was skipped (and counted with ``stats.skip``)."""
        raise NotImplementedError

    def close(self) -> None:
        """Finish: every file gets its final name and ``self.files`` describes them."""
        raise NotImplementedError

    def finish(self) -> None:
        """A parallel writer's part is done: its files are complete under their temporary names and
        ``self.files`` describes them (each with ``part``) for the process that :meth:`adopt` s them."""
        raise NotImplementedError

    def adopt(self, files: list[dict[str, Any]]) -> None:
        """Take over the finished files of every process (:meth:`finish`), before :meth:`close` names them."""
        self.files = sorted(files, key=lambda f: (f["part"], f.get("sub", 0)))

    def abort(self) -> None:
        """Remove everything written so far (called on any exception, Ctrl-C included)."""

    def index_fields(self) -> dict[str, Any]:
        """What this writer adds to ``index.json`` after :meth:`close` (after the common fields)."""
        return {}

    def notes(self) -> list[str]:
        """One-line notes for the user after :meth:`close` (``index.json``'s and the result's ``notes``)."""
        return []

    def fast_path(self, source: Source, progress: Callable[[int, int], None] | None = None) -> FastPath | None:
        """A :class:`FastPath` for exporting manifest rows of ``source``, or None (the per-sample path)."""
        return None

    def refuse_unsafe(self, shard: str, key: str, *names: str, text: tuple[str, ...] = ()) -> bool:
        """True when one of ``names`` (paths this writer is about to write for a sample;
        :func:`.names.path_problem`) or of ``text`` (other strings it writes, e.g. a shard name in a
        line; :func:`.names.text_problem`) is unsafe: the sample is then refused — counted as
        ``unsafe_name``, or a SourceError naming it under ``--on-error raise``. Call it before
        writing anything of the sample."""
        for name, check in [(n, path_problem) for n in names] + [(t, text_problem) for t in text]:
            why = check(name)
            if why is not None:
                return self.refuse(shard, key, repr(name), why)
        return False

    def refuse(self, shard: str, key: str, what: str, why: str) -> bool:
        """Refuse a sample for an unsafe name: counted as ``unsafe_name`` (True), or a SourceError
        naming it under ``--on-error raise``."""
        msg = unsafe_message(shard, key, what, why)
        if self.on_error.raises:
            raise SourceError(msg, reason=UNSAFE)
        self.stats.skip(UNSAFE, msg, shard)
        return True

    def unique_key(self, shard: str, key: str, *, peek: bool = False) -> str:
        """Keys are unique only inside an input shard; an output file gathers many. A key already in
        the current output file becomes ``<input shard stem>/<key>`` (then ``..._<n>``), counted
        (``peek``: only say what it would become)."""
        if key not in self.keys:
            return key
        stem = _KEY_SUFFIXES.sub("", shard).replace(".", "_")
        new = f"{stem}/{key}"
        n = 1
        while new in self.keys:
            new = f"{stem}/{key}_{n}"
            n += 1
        if not peek:
            self.stats.renamed_keys += 1
        return new

    def class_dirs(self) -> list[str]:
        """The directory of every class, in label order, chosen so that sorting them (as torchvision's
        ImageFolder and dataprune's folder source number classes) gives back the labels: the class
        names made safe when they are distinct (ignoring case), sort in label order and take no name of ours
        (``index.json``, ``classes.txt``); otherwise every class gets ``<label>_<name>`` with the label
        zero-padded to one width (``003_cat``; just ``003`` when the name cannot be used)."""
        if self._dirs is None:
            n = len(self.classes or [])
            names = [self._safe_class(i) for i in range(n)]
            distinct = None not in names and len({c.casefold() for c in names}) == n  # also on case-insensitive disks
            if distinct and names == sorted(names) and not {c.casefold() for c in names} & _RESERVED:
                self._dirs = names
            else:
                w = max(3, len(str(n - 1)))
                pre = [f"{i:0{w}d}" for i in range(n)]
                self._dirs = [p if c is None or path_problem(f"{p}_{c}") is not None else f"{p}_{c}" for p, c in zip(pre, names)]
        return self._dirs

    def class_dir(self, label: int | None) -> str:
        """The directory of a class (:meth:`class_dirs`); a label beyond the class names gets its number
        (``class_<label>`` when the export has class names)."""
        if label is None:
            return ""
        dirs = self.class_dirs()
        if 0 <= label < len(dirs):
            return dirs[label]
        return f"class_{label}" if dirs else str(label)

    def _safe_class(self, label: int) -> str | None:
        """A class name made safe for a directory name (``/`` and a backslash become ``_``), or None."""
        name = self.classes[label] if self.classes and 0 <= label < len(self.classes) else str(label)
        name = name.replace("/", "_").replace("\\", "_").replace("\x00", "")
        ok = name not in ("", ".", "..") and not name.startswith(".") and path_problem(name) is None
        return name if ok else None

    def _tmp(self, final: str) -> str:
        return final + ".tmp"


def plan_parts(positions: np.ndarray, plan: tuple[int, int]) -> np.ndarray:
    """The output shard of each position in the export's row order, for ``ExportConfig.shard_plan``'s
    ``(q, r)``: shards ``0..r-1`` hold ``q + 1`` rows, the later ones ``q``."""
    q, r = plan
    positions = np.asarray(positions, np.int64)
    big = r * (q + 1)
    return np.where(positions < big, positions // (q + 1), r + (positions - big) // max(q, 1))


# ----------------------------------------------------------------------------------------- registry

WRITERS: Registry[type[Writer]] = Registry("writer", lambda name, names: f"--to must be one of {', '.join(names)}, not {name!r}")


def register_writer(name: str, cls: type[Writer] | None = None):
    """Register a :class:`Writer` subclass as ``--to name``: ``register_writer("wds", WdsWriter)`` or
    as a class decorator, ``@register_writer("wds")``. Names keep the order they were registered in."""

    def add(c: type[Writer]) -> type[Writer]:
        if not (isinstance(c, type) and issubclass(c, Writer)):
            raise TypeError(f"register_writer({name!r}): {c!r} is not a Writer subclass")
        WRITERS.add(name, c)
        c.name = name
        return c

    return add if cls is None else add(cls)


def list_writers() -> list[str]:
    """The registered writer names, in registration order."""
    return WRITERS.names()


def writer_class(name: str) -> type[Writer]:
    """The writer registered as ``name`` (or an alias of it, ``webdataset`` → ``wds``); ConfigError
    (``--to``) for any other name."""
    return WRITERS.lookup(WRITER_ALIASES.get(name, name) if isinstance(name, str) else name)


def unregister_writer(name: str) -> None:
    WRITERS.remove(name)
