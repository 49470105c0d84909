"""Out-of-core `select`: the in-memory decision, taken in passes over the table's parts.

Every choice depends only on ``(sample_id, score, seed)`` and on counts, so it can be taken without
holding a column of the table's length: a counting pass gives the candidates, the groups and their
quotas (``plan_quotas``, the same arithmetic as in memory); each cut a strategy makes — the hardest
``--drop-hardest``/``--ccs-beta`` rows, the quota of a class, the allocation of a CCS stratum — is a
row at a known rank of the order ``(key, mix64(sample_id, seed), row)``, found exactly by
``radix.RankSearch``; a tally pass then counts what is kept (the manifest's metadata is written
first), and a last pass streams the kept rows into the manifest through the same writer as in
memory, so the manifest is the same file. Memory: O(groups × bins) plus a few parts.

What cannot stream: ``--by a,b`` (the mean rank needs every row's rank in every metric), joins with
other inputs (the join needs the base's keys), and strategies registered outside dataprune (their
``choose`` takes whole arrays). ``run.why_not`` names the reason; ``run_select`` then runs in memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import SelectConfig
from ..errors import TableError
from ..manifest import MANIFEST_READ
from ..tables import DEDUP_COLUMN, as_numpy
from .gather import _floats, _ok_mask
from .inputs import Input
from .order import order_key, random_key
from .radix import RankSearch, above
from .strategies import ccs_allocate, ccs_assign, ccs_plan, ccs_step, get_strategy, plan_quotas
from .tally import DENSE, LabelCount, as_float, class_stats, group_map, in_range

@dataclass
class View:
    """One part's decision columns and its candidate rows (as ``gather.candidates`` decides them)."""

    row0: int
    cand: np.ndarray
    lab: np.ndarray | None
    score: np.ndarray | None
    ids: np.ndarray | None
    t: pa.Table


class Stream:
    """One streamed selection of ``base`` (a score table) by metric ``by[0]`` (or none)."""

    def __init__(self, cfg: SelectConfig, base: Input, by: list[str], memory_limit: int):
        self.cfg, self.base = cfg, base
        self.metric = by[0] if by else None
        self.score_dtype = np.float32 if self.metric and base.schema.field(self.metric).type == pa.float32() else np.float64
        self.dedup = cfg.dedup
        self.hist_entries = int(np.clip(memory_limit // 128, 16, 1 << 22))  # 1/16 of the limit in int64 counts
        self.collect_rows = int(np.clip(memory_limit // 320, 16, 1 << 23))  # 1/8 of it in 40-byte rows
        self.rows: int | None = None
        self.passes = 0

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
        ok, self._reasons = _ok_mask(t.column("status"))
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
        for v in self.views(ids=False):
            n += len(v.cand)
            if v.score is not None:
                self._key_bounds(v)
            reasons.update(self._reasons)
            nulls += self._label_nulls
            nan, dup, oor = nan + self._nan, dup + self._dup, oor + self._oor
            self.rows_lab.add(v.lab)
            cl = v.lab[v.cand]
            self.cand_lab.add(cl)
            if v.score is not None and len(cl):
                cs = v.score[v.cand]
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

    def _key_bounds(self, v: View) -> None:
        """Smallest and largest order key per label (dense labels only; others disable the bounds)."""
        if self.key_lo is False:
            return
        lab, key = v.lab[v.cand], order_key(v.score[v.cand])
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

    # ----------------------------------------------------------------------------- decide
    def decide(self) -> None:
        """Budget, quotas and every cut, in as many passes as the cuts need."""
        cfg = self.cfg
        self.lab_map, self.lab_names = group_map(self.cand_values) if self.labelled else (None, None)
        if cfg.class_balanced:
            self.codes_of, names = self.lab_map, self.lab_names
            per = np.zeros(len(names), dtype=np.int64)
            np.add.at(per, self.lab_map(self.cand_values), self.cand_lab.at(self.cand_values))
            self.sizes = per
        else:
            self.codes_of, names = None, [None]
            self.sizes = np.array([self.ncand], dtype=np.int64)
        self.groups = len(names)
        self.k, ndrop, self.quotas = plan_quotas(cfg, self.ncand, self.sizes, self.metric is not None)
        self.ndrop = ndrop if ndrop is not None else np.zeros(self.groups, dtype=np.int64)
        self.dropped = int(self.ndrop.sum())
        self.elig = self.sizes - self.ndrop
        self.name = get_strategy(cfg.keep_mode).name
        self.key_bits = 32 if self.metric is None or self.base.schema.field(self.metric).type == pa.float32() else 64
        self.strata = None
        g = np.arange(self.groups)
        drop_t = [(int(x), int(self.sizes[x] - self.ndrop[x])) for x in g[self.ndrop > 0]]
        q = self.quotas
        if self.name in ("hard", "easy"):
            if self.name == "hard":
                keep_t = [(int(x), int(self.elig[x] - q[x])) for x in g[(q > 0) & (q < self.elig)]]
            else:
                keep_t = [(int(x), int(q[x] - 1)) for x in g[(q > 0) & (q < self.sizes)]]
            rs, maps = self._search([drop_t, keep_t], self.groups, self._score_key, self._codes, self._cand, self.key_bits)
            self.drop_cut, self.keep_cut = (rs, maps[0]), (rs, maps[1])
            return
        self.drop_cut = None
        if drop_t:
            rs, maps = self._search([drop_t], self.groups, self._score_key, self._codes, self._cand, self.key_bits)
            self.drop_cut = (rs, maps[0])
        if self.name == "random":
            keep_t = [(int(x), int(q[x] - 1)) for x in g[(q > 0) & (q < self.elig)]]
            rs, maps = self._search([keep_t], self.groups, self._random_key, self._codes, self._pool, 32)
            self.keep_cut = (rs, maps[0])
            return
        self._ccs_cells()  # ccs

    def _ccs_cells(self) -> None:
        k = self.cfg.ccs_strata
        lo, hi = np.full(self.groups, np.inf), np.full(self.groups, -np.inf)
        for v in self.views(ids=self.drop_cut is not None):
            p = self._pool(v)
            c, s = self._codes(v)[p], v.score[p].astype(np.float64)
            np.minimum.at(lo, c, s)
            np.maximum.at(hi, c, s)
        self.ccs_lo, self.ccs_step_ = lo, ccs_step(lo, hi, k)
        sizes = np.zeros(self.groups * k, dtype=np.int64)
        for v in self.views(ids=self.drop_cut is not None):
            p = self._pool(v)
            sizes += np.bincount(self._cells(v)[p], minlength=self.groups * k)
        self.cell_sizes = sizes
        alloc = ccs_allocate(self.quotas, sizes.reshape(self.groups, k)).reshape(-1)
        self.alloc = alloc
        cells = np.arange(len(alloc))
        keep_t = [(int(x), int(alloc[x] - 1)) for x in cells[(alloc > 0) & (alloc < sizes)]]
        rs, maps = self._search([keep_t], len(alloc), self._random_key, self._cells, self._pool, 32)
        self.keep_cut = (rs, maps[0])
        self.strata = ccs_plan(sizes.reshape(self.groups, k), alloc.reshape(self.groups, k), lo, self.ccs_step_)

    def _search(self, target_lists: list[list[tuple[int, int]]], groups: int, key_of, codes_of, mask_of,
                key_bits: int) -> tuple[RankSearch, list[np.ndarray]]:
        """One RankSearch over all the targets; per list, a map group → target (-1: none)."""
        flat = [t for lst in target_lists for t in lst]
        grp = np.array([t[0] for t in flat], dtype=np.intp)
        rank = np.array([t[1] for t in flat], dtype=np.int64)
        pops = self._pops(groups, codes_of, mask_of) if flat else np.zeros(0, dtype=np.int64)
        lo, hi = self._group_key_bounds(grp) if key_of == self._score_key and codes_of == self._codes else (None, None)
        rs = RankSearch(grp, rank, pops[grp] if flat else rank, groups, key_bits, self.cfg.seed,
                        hist_entries=self.hist_entries, collect_rows=self.collect_rows, origin=self.base.path, lo=lo, hi=hi)
        maps, at = [], 0
        for lst in target_lists:
            m = np.full(groups, -1, dtype=np.intp)
            m[grp[at:at + len(lst)]] = np.arange(at, at + len(lst))
            maps.append(m)
            at += len(lst)
        while rs.active:
            rs.begin()
            random = key_of == self._random_key
            for v in self.views(ids=random or rs.needs_ids() or mask_of != self._cand):
                rs.feed(codes_of(v), key_of(v), v.ids, v.row0, mask_of(v))
            rs.end()
        return rs, maps

    def _pops(self, groups: int, codes_of, mask_of) -> np.ndarray:
        """Rows per group among the searched rows, from counts already known."""
        if codes_of == self._codes:
            return self.sizes if mask_of == self._cand else self.elig
        return self.cell_sizes

    # --------------------------------------------------------------------- per-row pieces
    def _codes(self, v: View) -> np.ndarray:
        """Each row's group; rows that are no candidates (their label may be in no group) get group 0."""
        if self.codes_of is None:
            return np.zeros(len(v.cand), dtype=np.intp)
        return np.where(v.cand, self.codes_of(v.lab), 0)

    def _score_key(self, v: View) -> np.ndarray:
        return order_key(v.score)

    def _random_key(self, v: View) -> np.ndarray:
        return random_key(v.ids, self.cfg.seed)

    def _cand(self, v: View) -> np.ndarray:
        return v.cand

    def _cut(self, cut, v: View, codes: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows whose group has a target in ``cut``, and whether each is after / at its target."""
        rs, tmap = cut
        t = tmap[codes]
        has = t >= 0
        gt = np.zeros(len(codes), dtype=bool)
        eq = np.zeros(len(codes), dtype=bool)
        r = np.flatnonzero(has & v.cand)
        if len(r):
            tt = t[r]
            g, e = above(key[r], v.ids[r], np.arange(len(codes), dtype=np.int64)[r] + v.row0, rs.rk[tt], rs.rh[tt],
                         rs.ri[tt], self.cfg.seed)
            gt[r], eq[r] = g, e
        return has, gt, eq

    def _pool(self, v: View) -> np.ndarray:
        """Candidates left after the hardest rows were dropped."""
        if self.drop_cut is None:
            return v.cand
        has, gt, eq = self._cut(self.drop_cut, v, self._codes(v), self._score_key(v))
        return v.cand & ~(has & (gt | eq))

    def _cells(self, v: View) -> np.ndarray:
        c = self._codes(v)
        s = np.where(np.isnan(v.score), 0.0, v.score.astype(np.float64))  # rows outside the pool: any valid cell
        k = self.cfg.ccs_strata
        with np.errstate(invalid="ignore"):
            return c * k + ccs_assign(s, c, self.ccs_lo, self.ccs_step_, k)

    def keep(self, v: View) -> np.ndarray:
        """The kept rows of one part."""
        codes = self._codes(v)
        if self.name in ("hard", "easy"):
            key = self._score_key(v)
            q = self.quotas[codes]
            has, gt, eq = self._cut(self.keep_cut, v, codes, key)
            if self.name == "easy":
                return v.cand & (q == self.sizes[codes]) | (v.cand & (q > 0) & has & ~gt)
            dhas, dgt, deq = self._cut(self.drop_cut, v, codes, key)
            pool = v.cand & ~(dhas & (dgt | deq))
            return pool & (q > 0) & (~has | gt | eq)
        pool = self._pool(v)
        if self.name == "random":
            q, full = self.quotas[codes], self.elig[codes]
            has, gt, _ = self._cut(self.keep_cut, v, codes, self._random_key(v))
        else:
            codes = self._cells(v)
            q, full = self.alloc[codes], self.cell_sizes[codes]
            has, gt, _ = self._cut(self.keep_cut, v, codes, self._random_key(v))
        return pool & ((q == full) | ((q > 0) & has & ~gt))

    # ------------------------------------------------------------------------ tally, write
    def tally(self) -> None:
        """Count what is kept (the manifest's metadata holds it, so this comes before the write)."""
        g = len(self.lab_names) if self.lab_names is not None else 0
        self.kept_lab = LabelCount()
        self.kept = 0
        self.kept_per = np.zeros(g, dtype=np.int64)
        dt = np.float32 if self.key_bits == 32 else np.float64
        self.kept_lo, self.kept_hi = np.full(g, np.inf, dtype=dt), np.full(g, -np.inf, dtype=dt)
        lo, hi = np.inf, -np.inf
        for v in self.views(ids=True):
            keep = self.keep(v)
            self.kept += int(np.count_nonzero(keep))
            kl = v.lab[keep]
            self.kept_lab.add(kl)
            if self.lab_map is not None and len(kl):
                kc = self.lab_map(kl)
                self.kept_per += np.bincount(kc, minlength=g)
                if v.score is not None:
                    ks = v.score[keep]
                    np.minimum.at(self.kept_lo, kc, ks)
                    np.maximum.at(self.kept_hi, kc, ks)
            if v.score is not None and keep.any():
                ks = v.score[keep]
                lo, hi = min(lo, ks.min()), max(hi, ks.max())
        self.kept_range = (lo, hi)

    def summary_parts(self) -> dict[str, Any]:
        """The pieces of `run._summary` and `lost_classes` the passes computed."""
        per_class = None
        if self.lab_names is not None:
            cand = np.zeros(len(self.lab_names), dtype=np.int64)
            np.add.at(cand, self.lab_map(self.cand_values), self.cand_lab.at(self.cand_values))
            has_score = self.metric is not None
            per_class = class_stats(self.lab_names, cand, self.kept_per, self.kept_lo if has_score else None,
                                    self.kept_hi if has_score else None)
        rng = None
        if self.metric is not None:
            rng = {"candidates": [as_float(self.score_lo), as_float(self.score_hi)],
                   "kept": [as_float(self.kept_range[0]), as_float(self.kept_range[1])]}
        return {"kept": self.kept, "budget": self.k, "dropped_hardest": self.dropped, "per_class": per_class,
                "strata": self.strata, "score_range": rng}

    def lost(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per class label (≥ 0, ascending): rows, candidates, kept."""
        if not self.labelled:
            z = np.zeros(0, dtype=np.int64)
            return z, z, z, z
        vals = self.rows_lab.values()
        vals = vals[vals >= 0]
        return vals, self.rows_lab.at(vals), self.cand_lab.at(vals), self.kept_lab.at(vals)

    def pieces(self) -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray, list[np.ndarray]]]:
        """The write pass: per part, its manifest columns, ids, kept rows and score column."""
        for v in self.views(ids=True, extra=MANIFEST_READ):
            keep = self.keep(v)
            yield v.t.select(MANIFEST_READ), v.ids, keep, ([v.score] if v.score is not None else [])
