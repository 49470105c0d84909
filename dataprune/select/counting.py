"""The reading and the counting pass of an out-of-core `select` (``stream``).

``Counted.views`` yields each part's decision columns with its candidate rows (decided as
``gather.candidates`` does in memory); ``Counted.count`` is the first pass: rows, exclusions,
candidates per label, the candidates' score range and key bounds per label, and — when a search by
score follows — the first histogram of that search (``radix.FirstHist``), so the search starts in
the bin of each cut instead of spending a pass on the whole range.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import SelectConfig
from ..errors import TableError
from ..tables import DEDUP_COLUMN, as_numpy
from .gather import _floats, _ok_mask
from .inputs import Input
from .order import order_key
from .radix import FirstHist
from .strategies import get_strategy
from .tally import DENSE, KeptBits, KeptTally, LabelCount, in_range

FIRST_HIST_ENTRIES = 1 << 20  # at most: its counts then stay in cache (8 MB), and its bins narrow the cuts enough


@dataclass
class View:
    """One part's decision columns and its candidate rows (as ``gather.candidates`` decides them)."""

    row0: int
    cand: np.ndarray
    lab: np.ndarray | None
    score: np.ndarray | None
    ids: np.ndarray | None
    t: pa.Table | None
    rownum: np.ndarray | None = None  # table row numbers, where the rows are not the part's row0, row0 + 1, ...
    memo: dict = field(default_factory=dict)  # per-row arrays derived once per view (``Stream._codes``, ``_score_key``)


class Counted:
    """The reading of one streamed selection of ``base`` (a score table) by metric ``by[0]`` (or none),
    and its counting pass; ``stream.Stream`` takes the decision from there."""

    def __init__(self, cfg: SelectConfig, base: Input, by: list[str], memory_limit: int):
        self.cfg, self.base = cfg, base
        self.metric = by[0] if by else None
        self.score_dtype = np.float32 if self.metric and base.schema.field(self.metric).type == pa.float32() else np.float64
        self.dedup = cfg.dedup
        self.hist_entries = int(np.clip(memory_limit // 128, 16, 1 << 22))  # 1/16 of the limit in int64 counts
        self.collect_rows = int(np.clip(memory_limit // 320, 16, 1 << 23))  # 1/8 of it in 40-byte rows
        self.memory_limit = memory_limit
        self.key_bits = 32 if self.metric is None or base.schema.field(self.metric).type == pa.float32() else 64
        self.rows: int | None = None
        self.passes = 0
        self.kt: KeptTally | None = None
        self.bits: KeptBits | None = None

    # ----------------------------------------------------------------------------- reading
    def views(self, ids: bool, extra: list[str] | None = None) -> Iterator[View]:
        cols = ["status", "label"] + ([self.metric] if self.metric else []) + ([DEDUP_COLUMN] if self.dedup else [])
        cols += (["sample_id"] if ids else []) + [c for c in extra or [] if c not in cols and (c != "sample_id" or not ids)]
        self.passes += 1
        off = 0
        for t in self.base.pieces(cols):
            v = self._view(t, off)
            off += t.num_rows
            if self.rows is not None and off > self.rows:
                break
            yield v
        if self.rows is not None and off != self.rows:
            raise TableError(f"{self.base.path} changed while it was being read; run select again")

    def _view(self, t: pa.Table, row0: int) -> View:
        c = self.cfg
        ok, self._reasons = _ok_mask(t.column("status"), reasons_too=self.rows is None)  # counted in the first pass
        col = t.column("label")
        self._label_nulls = col.null_count
        lab = as_numpy(col if col.type == pa.int32() else pc.cast(col, pa.int32()), fill=-1)
        score = _floats(t.column(self.metric)).astype(self.score_dtype, copy=False) if self.metric else None  # as in memory
        alive = ok
        self._nan = self._dup = self._oor = 0
        if score is not None:
            nan = np.isnan(score)
            self._nan = int(np.count_nonzero(alive & nan))
            alive = alive & ~nan
        if self.dedup:
            dup = as_numpy(t.column(DEDUP_COLUMN), fill=False)
            self._dup = int(np.count_nonzero(alive & dup))
            alive = alive & ~dup
        if score is not None and (c.min_score is not None or c.max_score is not None):
            inside = in_range(score, c.min_score, c.max_score)
            self._oor = int(np.count_nonzero(alive & ~inside))
            alive = alive & inside
        ids = as_numpy(pc.cast(t.column("sample_id"), pa.uint64())) if "sample_id" in t.column_names else None
        return View(row0, alive, lab, score, ids, t)

    # ------------------------------------------------------------------------------ pass 1
    def count(self) -> None:
        """The counting pass: rows, exclusions, candidates per label, the candidates' score range."""
        reasons: Counter = Counter()
        self.rows_lab, self.cand_lab = LabelCount(), LabelCount()
        n = nulls = nan = dup = oor = 0
        lo, hi = np.inf, -np.inf
        self.key_lo = self.key_hi = None  # per label slot (label + 1), for the first histogram's range
        fh = None
        if self.metric and (get_strategy(self.cfg.keep_mode).name in ("hard", "easy") or self.cfg.drop_hardest > 0
                            or self.cfg.ccs_beta > 0):  # a search by score follows: this pass takes its first histogram
            slots = len(self.base.meta.get("classes") or []) + 1
            fh = FirstHist(slots, min(self.hist_entries, FIRST_HIST_ENTRIES), self.key_bits, per_label=self.cfg.class_balanced)
        self.first = fh
        for v in self.views(ids=False):
            n += len(v.cand)
            cl = v.lab[v.cand]
            cs = v.score[v.cand] if v.score is not None else None
            if cs is not None:
                key = order_key(cs)
                self._key_bounds(cl, key)
                if fh is not None:
                    fh.add(cl, key)
            reasons.update(self._reasons)
            nulls += self._label_nulls
            nan, dup, oor = nan + self._nan, dup + self._dup, oor + self._oor
            self.rows_lab.add(v.lab)
            self.cand_lab.add(cl)
            if cs is not None and len(cl):
                lo, hi = min(lo, cs.min()), max(hi, cs.max())
        self.rows = n
        if n == 0:
            raise TableError(f"{self.base.path}: no rows")
        self.labelled = nulls != n
        self.excluded: dict[str, int] = {f"status:{r}": c for r, c in reasons.items()}
        if nan:
            if self.cfg.nan == "error":
                raise TableError(f"{nan} selectable rows have no score (NaN or missing) in {self.metric}; "
                                 "pass --nan drop to leave them out")
            self.excluded["nan"] = nan
        if self.dedup:
            self.excluded["duplicate"] = dup
        if oor:
            self.excluded["out_of_range"] = oor
        self.cand_values = self.cand_lab.values()
        self.ncand = int(self.cand_lab.at(self.cand_values).sum())
        self.score_lo, self.score_hi = lo, hi

    def _key_bounds(self, lab: np.ndarray, key: np.ndarray) -> None:
        """Smallest and largest order key per label (dense labels only; others disable the bounds)."""
        if self.key_lo is False:
            return
        if not len(lab):
            return
        if int(lab.min()) < -1 or int(lab.max()) >= DENSE:
            self.key_lo = self.key_hi = False
            return
        slot = lab.astype(np.intp) + 1
        size = int(slot.max()) + 1
        if self.key_lo is None or len(self.key_lo) < size:
            lo, hi = np.full(size, np.iinfo(key.dtype).max, key.dtype), np.zeros(size, key.dtype)
            if self.key_lo is not None:
                lo[:len(self.key_lo)], hi[:len(self.key_hi)] = self.key_lo, self.key_hi
            self.key_lo, self.key_hi = lo, hi
        np.minimum.at(self.key_lo, slot, key)
        np.maximum.at(self.key_hi, slot, key)

    def _group_key_bounds(self, grp: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per target group (plan codes), bounds of the score's order key among its candidates."""
        if self.key_lo is None or self.key_lo is False:
            return None, None
        lab = np.arange(len(self.key_lo)) - 1
        seen = self.key_lo <= self.key_hi
        codes = self.codes_of(lab) if self.codes_of is not None else np.zeros(len(lab), dtype=np.intp)
        lo = np.full(self.groups, np.iinfo(self.key_lo.dtype).max, dtype=np.uint64)
        hi = np.zeros(self.groups, dtype=np.uint64)
        ok = seen & (codes >= 0) & (codes < self.groups)
        np.minimum.at(lo, codes[ok], self.key_lo[ok].astype(np.uint64))
        np.maximum.at(hi, codes[ok], self.key_hi[ok].astype(np.uint64))
        return lo[grp], hi[grp]

    def has_class_labels(self) -> bool:
        return self.labelled and bool((self.cand_values >= 0).any())
