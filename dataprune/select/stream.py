"""Out-of-core `select`: the in-memory decision, taken in passes over the table's parts.

Every choice depends only on ``(sample_id, score, seed)`` and on counts, so it can be taken without
holding a column of the table's length: a counting pass (``counting``) gives the candidates, the
groups and their quotas (``plan_quotas``, the same arithmetic as in memory) and the first histogram
of the score; each cut a strategy makes — the hardest ``--drop-hardest``/``--ccs-beta`` rows, the
quota of a class, the allocation of a CCS stratum — is a row at a known rank of the order
``(key, mix64(sample_id, seed), row)``, found exactly by ``radix.RankSearch``. The last search's
final pass also tallies what is kept (the manifest's metadata holds it, so it comes before the
write) and records the kept rows as bits, and a last pass streams them into the manifest through
the same writer as in memory, reading only the manifest's columns, so the manifest is the same
file. For `--keep hard|easy` at 20M rows: three passes. Memory: O(groups × bins) plus a few parts,
plus one bit a row when that fits in 1/16 of the limit (else the write pass decides again).

What cannot stream: ``--by a,b`` (the mean rank needs every row's rank in every metric), joins with
other inputs (the join needs the base's keys), and strategies registered outside dataprune (their
``choose`` takes whole arrays). ``run.why_not`` names the reason; ``run_select`` then runs in memory.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import TableError
from ..manifest import MANIFEST_READ
from ..tables import as_numpy
from .counting import Counted, View
from .gather import _floats
from .order import order_key, random_key
from .radix import RankSearch, above
from .strategies import ccs_allocate, ccs_assign, ccs_plan, ccs_step, get_strategy, plan_quotas
from .tally import KeptBits, KeptTally, as_float, class_stats, group_map


class Stream(Counted):
    """One streamed selection: the decision (every cut a ``RankSearch``), the tally and the write pass."""

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
        self.strata = None
        g = np.arange(self.groups)
        drop_t = [(int(x), int(self.sizes[x] - self.ndrop[x])) for x in g[self.ndrop > 0]]
        q = self.quotas
        if self.name in ("hard", "easy"):
            if self.name == "hard":
                keep_t = [(int(x), int(self.elig[x] - q[x])) for x in g[(q > 0) & (q < self.elig)]]
            else:
                keep_t = [(int(x), int(q[x] - 1)) for x in g[(q > 0) & (q < self.sizes)]]
            rs, maps = self._targets([drop_t, keep_t], self.groups, self._score_key, self._codes, self._cand, self.key_bits)
            self.drop_cut, self.keep_cut = (rs, maps[0]), (rs, maps[1])
            self._search(rs, self._score_key, self._codes, self._cand, last=True)
            return
        self.drop_cut = None
        if drop_t:
            rs, maps = self._targets([drop_t], self.groups, self._score_key, self._codes, self._cand, self.key_bits)
            self._search(rs, self._score_key, self._codes, self._cand)
            self.drop_cut = (rs, maps[0])
        if self.name == "random":
            keep_t = [(int(x), int(q[x] - 1)) for x in g[(q > 0) & (q < self.elig)]]
            rs, maps = self._targets([keep_t], self.groups, self._random_key, self._codes, self._pool, 32)
            self.keep_cut = (rs, maps[0])
            self._search(rs, self._random_key, self._codes, self._pool, last=True)
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
        rs, maps = self._targets([keep_t], len(alloc), self._random_key, self._cells, self._pool, 32)
        self.keep_cut = (rs, maps[0])
        self._search(rs, self._random_key, self._cells, self._pool, last=True)
        self.strata = ccs_plan(sizes.reshape(self.groups, k), alloc.reshape(self.groups, k), lo, self.ccs_step_)

    def _targets(self, target_lists: list[list[tuple[int, int]]], groups: int, key_of, codes_of, mask_of,
                 key_bits: int) -> tuple[RankSearch, list[np.ndarray]]:
        """One RankSearch over all the targets; per list, a map group → target (-1: none). A search by
        score over the candidates starts in the bins of the counting pass's histogram."""
        flat = [t for lst in target_lists for t in lst]
        grp = np.array([t[0] for t in flat], dtype=np.intp)
        rank = np.array([t[1] for t in flat], dtype=np.int64)
        pops = self._pops(groups, codes_of, mask_of)[grp] if flat else rank
        by_score = key_of == self._score_key and codes_of == self._codes
        lo, hi = self._group_key_bounds(grp) if by_score else (None, None)
        if by_score and mask_of == self._cand and flat and self.first is not None and self.first.ok:
            rank, pops, blo, bhi = self.first.narrow(self._slots(grp), rank)
            lo, hi = (blo, bhi) if lo is None else (np.maximum(lo, blo), np.minimum(hi, bhi))
        rs = RankSearch(grp, rank, pops, groups, key_bits, self.cfg.seed,
                        hist_entries=self.hist_entries, collect_rows=self.collect_rows, origin=self.base.path, lo=lo, hi=hi)
        maps, at = [], 0
        for lst in target_lists:
            m = np.full(groups, -1, dtype=np.intp)
            m[grp[at:at + len(lst)]] = np.arange(at, at + len(lst))
            maps.append(m)
            at += len(lst)
        return rs, maps

    def _slots(self, grp: np.ndarray) -> list[np.ndarray]:
        """Per target group, the FirstHist slots (label + 1) of its rows."""
        if not self.cfg.class_balanced:
            return [np.zeros(1, dtype=np.intp)] * len(grp)
        top = len(self.lab_names) - (1 if self.lab_names and self.lab_names[-1] is None else 0)  # dense codes = labels
        return [np.array([g + 1 if g < top else 0]) for g in grp.tolist()]

    def _search(self, rs: RankSearch, key_of, codes_of, mask_of, last: bool = False) -> None:
        """The passes of one search. The ``last`` search of the decision tallies what is kept in its
        final pass (every target collecting its rows): rows outside every target's range are decided
        already, the rest once the pass has found the targets' rows."""
        while rs.active:
            rs.begin()
            if last and rs.final():
                return self._tally(rs, key_of, codes_of, mask_of)
            random = key_of == self._random_key
            for v in self.views(ids=random or rs.needs_ids() or mask_of != self._cand):
                rs.feed(codes_of(v), key_of(v), v.ids, v.row0, mask_of(v))
            rs.end()

    def _pops(self, groups: int, codes_of, mask_of) -> np.ndarray:
        """Rows per group among the searched rows, from counts already known."""
        if codes_of == self._codes:
            return self.sizes if mask_of == self._cand else self.elig
        return self.cell_sizes

    # --------------------------------------------------------------------- per-row pieces
    def _codes(self, v: View) -> np.ndarray:
        """Each row's group; rows that are no candidates (their label may be in no group) get group 0."""
        c = v.memo.get("codes")
        if c is None:
            c = v.memo["codes"] = (np.zeros(len(v.cand), dtype=np.intp) if self.codes_of is None
                                   else np.where(v.cand, self.codes_of(v.lab), 0))
        return c

    def _score_key(self, v: View) -> np.ndarray:
        k = v.memo.get("key")
        if k is None:
            k = v.memo["key"] = order_key(v.score)
        return k

    def _random_key(self, v: View) -> np.ndarray:
        return random_key(v.ids, self.cfg.seed)

    def _cand(self, v: View) -> np.ndarray:
        return v.cand

    def _cut(self, cut, v: View, codes: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows whose group has a target in ``cut``, and whether each is after / at its target."""
        rs, tmap = cut
        gt = np.zeros(len(codes), dtype=bool)
        eq = np.zeros(len(codes), dtype=bool)
        if not len(tmap) or tmap.max() < 0:  # no group has a target (e.g. no --drop-hardest)
            return np.zeros(len(codes), dtype=bool), gt, eq
        t = tmap[codes]
        has = t >= 0
        r = np.flatnonzero(has & v.cand)
        if len(r):
            tt = t[r]
            row = r + v.row0 if v.rownum is None else v.rownum[r]
            g, e = above(key[r], v.ids[r], row, rs.rk[tt], rs.rh[tt], rs.ri[tt], self.cfg.seed)
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
    def _new_tally(self) -> KeptTally:
        g = len(self.lab_names) if self.lab_names is not None else 0
        return KeptTally(self.lab_map, g, self.score_dtype if self.metric else None)

    def tally(self) -> None:
        """Count what is kept (the manifest's metadata holds it, so this comes before the write), unless
        the decision's last pass did."""
        if self.kt is not None:
            return
        self.kt, self.bits = self._new_tally(), self._new_bits()
        for v in self.views(ids=True):
            keep = self.keep(v)
            self.kt.add(v.lab, v.score, keep)
            if self.bits is not None:
                self.bits.add(keep)

    def _new_bits(self) -> KeptBits | None:
        """Bits for the kept rows where they take at most 1/16 of the memory limit."""
        return KeptBits() if (self.rows or 0) // 8 <= self.memory_limit // 16 else None

    def _tally(self, rs: RankSearch, key_of, codes_of, mask_of) -> None:
        """``rs``'s final pass, which also tallies (see ``_search``)."""
        rs.provisional()
        kt, later, bits = self._new_tally(), [], self._new_bits()
        for v in self.views(ids=True):
            got = rs.feed(codes_of(v), key_of(v), v.ids, v.row0, mask_of(v))
            keep = self.keep(v)
            if got is not None:
                keep &= ~got
                r = np.flatnonzero(got)
                later.append(View(0, v.cand[r], v.lab[r], v.score[r] if v.score is not None else None, v.ids[r], None,
                                  r.astype(np.int64) + v.row0))
            kt.add(v.lab, v.score, keep)
            if bits is not None:
                bits.add(keep)
        rs.end()
        if later:
            cat = lambda f: None if getattr(later[0], f) is None else np.concatenate([getattr(x, f) for x in later])  # noqa: E731
            v = View(0, cat("cand"), cat("lab"), cat("score"), cat("ids"), None, cat("rownum"))
            keep = self.keep(v)
            kt.add(v.lab, v.score, keep)
            if bits is not None:
                bits.set(v.rownum[keep])
        self.kt, self.bits = kt, bits

    def summary_parts(self) -> dict[str, Any]:
        """The pieces of `run._summary` and `lost_classes` the passes computed."""
        per_class = None
        if self.lab_names is not None:
            cand = np.zeros(len(self.lab_names), dtype=np.int64)
            np.add.at(cand, self.lab_map(self.cand_values), self.cand_lab.at(self.cand_values))
            has_score = self.metric is not None
            per_class = class_stats(self.lab_names, cand, self.kt.per, self.kt.lo if has_score else None,
                                    self.kt.hi if has_score else None)
        rng = None
        if self.metric is not None:
            rng = {"candidates": [as_float(self.score_lo), as_float(self.score_hi)],
                   "kept": [as_float(self.kt.range[0]), as_float(self.kt.range[1])]}
        return {"kept": self.kt.kept, "budget": self.k, "dropped_hardest": self.dropped, "per_class": per_class,
                "strata": self.strata, "score_range": rng}

    def lost(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per class label (≥ 0, ascending): rows, candidates, kept."""
        if not self.labelled:
            z = np.zeros(0, dtype=np.int64)
            return z, z, z, z
        vals = self.rows_lab.values()
        vals = vals[vals >= 0]
        return vals, self.rows_lab.at(vals), self.cand_lab.at(vals), self.kt.lab.at(vals)

    def pieces(self) -> Iterator[tuple[pa.Table, np.ndarray, np.ndarray, list[np.ndarray]]]:
        """The write pass: per part, its manifest columns, ids, kept rows and score column. With the
        tally's bits only those columns are read; else each part is decided again."""
        if self.bits is None:
            for v in self.views(ids=True, extra=MANIFEST_READ):
                keep = self.keep(v)
                yield v.t.select(MANIFEST_READ), v.ids, keep, ([v.score] if v.score is not None else [])
            return
        self.passes += 1
        cols = MANIFEST_READ + ["sample_id"] + ([self.metric] if self.metric else [])
        i, keep = -1, np.zeros(0, dtype=bool)
        for i, t in enumerate(self.base.pieces(cols)):
            keep = self.bits.part(i, t.num_rows)
            if keep is None:
                break
            ids = as_numpy(pc.cast(t.column("sample_id"), pa.uint64()))
            score = [_floats(t.column(self.metric)).astype(self.score_dtype, copy=False)] if self.metric else []
            yield t.select(MANIFEST_READ), ids, keep, score
        if keep is None or i + 1 != len(self.bits.bits):
            raise TableError(f"{self.base.path} changed while it was being read; run select again")
