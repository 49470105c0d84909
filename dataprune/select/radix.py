"""Exact order statistics per group over rows that arrive in batches, in memory O(groups × bins).

The in-memory strategies order the rows of a group by ``(key, mix64(sample_id, seed), row)`` — the
``order_key`` of the score (or the ``random_key``), the tie-breaking hash, then the row's place in
the table (``top_k_per_group`` keeps equal hashes in row order). ``RankSearch`` finds, for each
target (a group and a rank in that order), the exact row at that rank without holding the rows:
each pass over the table either counts the rows of the target's current value range in a histogram
of its next digits (radix selection: the range shrinks to one bin) or, once few enough rows are
left in the range, collects them and sorts them exactly. Ranges run over the key first and, once
the key is fixed (ties), over the hash; rows equal in both are ordered by their row number.
``above`` then compares any row with a target's row, so a pass can decide "keep" row by row.
"""

from __future__ import annotations

import numpy as np

from ..errors import TableError
from ..ids import mix64

KEY, HASH = 0, 1
NONE, HIST, COLLECT = 0, 1, 2
FLUSH = 1 << 21  # buffered histogram entries before one bincount
DENSE_LABELS = 1 << 24  # labels a FirstHist counts per slot (tally.DENSE)


class RankSearch:
    """Targets ``(group[t], rank[t])`` (rank 0-based, ascending, among the rows the caller feeds
    for that group; ``pop[t]`` of them). ``key_bits``: 32 (float32 scores, random keys) or 64;
    ``lo``/``hi``: per target, bounds known to hold every key it counts (default: the whole range).
    Passes: ``begin()``, ``feed(...)`` for every batch, ``end()``; repeat while ``active``."""

    def __init__(self, group: np.ndarray, rank: np.ndarray, pop: np.ndarray, groups: int, key_bits: int, seed: int,
                 *, hist_entries: int = 1 << 22, collect_rows: int = 1 << 22, origin: str = "the score table",
                 lo: np.ndarray | None = None, hi: np.ndarray | None = None):
        self.group = np.asarray(group, dtype=np.intp)
        self.rank = np.asarray(rank, dtype=np.int64).copy()
        self.pop = np.asarray(pop, dtype=np.int64).copy()
        n = len(self.rank)
        if ((self.rank < 0) | (self.rank >= self.pop)).any():
            raise ValueError("a target's rank is outside its group")
        self.seed, self.origin = seed, origin
        self.hist_entries, self.collect_rows = max(16, hist_entries), max(1, collect_rows)
        self.phase = np.zeros(n, dtype=np.int8)
        self.lo = np.zeros(n, dtype=np.uint64) if lo is None else np.asarray(lo, dtype=np.uint64).copy()  # known key bounds
        self.hi = np.full(n, (1 << key_bits) - 1, dtype=np.uint64) if hi is None else np.asarray(hi, dtype=np.uint64).copy()
        self.fixed = np.zeros(n, dtype=np.uint64)  # the key, once the range runs over the hash
        self.done = np.zeros(n, dtype=bool)
        self.rk = np.zeros(n, dtype=np.uint64)
        self.rh = np.zeros(n, dtype=np.uint64)
        self.ri = np.zeros(n, dtype=np.int64)
        self.passes = 0
        order = np.argsort(self.group, kind="stable")  # slot s of a group: its s-th target
        g_sorted = self.group[order]
        first = np.searchsorted(g_sorted, g_sorted, side="left")
        slot = np.arange(n) - first
        self.slots = []
        for s in range(int(slot.max()) + 1 if n else 0):
            m = np.full(groups, -1, dtype=np.intp)
            sel = slot == s
            m[g_sorted[sel]] = order[sel]
            self.slots.append(m)

    @property
    def active(self) -> bool:
        return not bool(self.done.all())

    def begin(self) -> None:
        """Choose, per unfinished target, to histogram its range or to collect its rows."""
        self.passes += 1
        n = len(self.rank)
        self.mode = np.zeros(n, dtype=np.int8)
        live = np.flatnonzero(~self.done)
        forced = live[(self.phase[live] == HASH) & (self.lo[live] == self.hi[live])]  # only the row number is left
        rest = live[~np.isin(live, forced)]
        by_pop = rest[np.argsort(self.pop[rest], kind="stable")]
        room = self.collect_rows - int(self.pop[forced].sum())
        cum = np.cumsum(self.pop[by_pop])
        take = by_pop[cum <= max(room, 0)]
        self.mode[forced] = COLLECT
        self.mode[take] = COLLECT
        hist = np.flatnonzero(self.mode[: n] == NONE)
        hist = hist[~self.done[hist]]
        self.mode[hist] = HIST
        self.hj = np.full(n, -1, dtype=np.int64)
        self.hj[hist] = np.arange(len(hist))
        self.nhist = len(hist)
        bits = int(np.clip(np.floor(np.log2(max(1, self.hist_entries // max(1, self.nhist)))), 1, 16))
        self.bins = 1 << bits
        self.shift = np.zeros(n, dtype=np.uint64)
        for t in hist.tolist():
            width = int(self.hi[t]) - int(self.lo[t])  # range size - 1
            self.shift[t] = max(0, width.bit_length() - bits)
        self.hist = np.zeros(self.nhist * self.bins, dtype=np.int64)
        self.buf: list[np.ndarray] = []
        self.nbuf = 0
        self.got: list[tuple[np.ndarray, ...]] = []

    def final(self) -> bool:
        """Whether this pass (after ``begin``) finishes every target: all collect their rows."""
        return self.nhist == 0

    def provisional(self) -> None:
        """Before a ``final`` pass: stand-in target rows, inside each unfinished target's range, so that
        ``above`` decides every row outside the ranges as the found rows will (the rows inside are the
        ones the pass collects; ``feed`` returns them)."""
        live = ~self.done
        key = live & (self.phase == KEY)
        self.rk[key], self.rh[key], self.ri[key] = self.lo[key], 0, 0
        hp = live & (self.phase == HASH)
        self.rk[hp], self.rh[hp], self.ri[hp] = self.fixed[hp], self.lo[hp], -1

    def needs_ids(self) -> bool:
        """Whether this pass hashes ids (ranges over the hash, or rows to collect)."""
        live = ~self.done
        return bool(((self.phase == HASH) & live).any() or (self.mode == COLLECT).any())

    def feed(self, codes: np.ndarray | None, key: np.ndarray, ids: np.ndarray, row0: int,
             mask: np.ndarray) -> np.ndarray | None:
        """One batch: ``codes`` each row's group (None: group 0), ``key`` its order key, ``ids`` its
        sample ids, ``row0`` the table row number of its first row, ``mask`` the rows that count.
        Returns the rows collected (a mask; None when none was)."""
        got = None
        for tmap in self.slots:
            t = np.full(len(key), tmap[0], dtype=np.intp) if codes is None else tmap[codes]
            sel = mask & (t >= 0)
            r = np.flatnonzero(sel)
            if not len(r):
                continue
            tt = t[r]
            m = self.mode[tt]
            keep = m != NONE
            r, tt, m = r[keep], tt[keep], m[keep]
            kk = key[r].astype(np.uint64)
            ph = self.phase[tt]
            inr = np.zeros(len(r), dtype=bool)
            val = kk.copy()
            hrows = np.zeros(len(r), dtype=np.uint64)
            kp = ph == KEY
            inr[kp] = (kk[kp] >= self.lo[tt[kp]]) & (kk[kp] <= self.hi[tt[kp]])
            hp = np.flatnonzero(~kp)
            if len(hp):
                hp = hp[kk[hp] == self.fixed[tt[hp]]]
                h = mix64(ids[r[hp]], self.seed)
                hrows[hp] = h
                val[hp] = h
                inr[hp] = (h >= self.lo[tt[hp]]) & (h <= self.hi[tt[hp]])
            hi_ = np.flatnonzero(inr & (m == HIST))
            if len(hi_):
                d = ((val[hi_] - self.lo[tt[hi_]]) >> self.shift[tt[hi_]]).astype(np.int64)
                self.buf.append(self.hj[tt[hi_]] * self.bins + d)
                self.nbuf += len(hi_)
                if self.nbuf >= max(FLUSH, len(self.hist)):
                    self._flush()
            co = np.flatnonzero(inr & (m == COLLECT))
            if len(co):
                need = co[ph[co] == KEY]
                hrows[need] = mix64(ids[r[need]], self.seed)
                self.got.append((tt[co], kk[co], hrows[co], r[co].astype(np.int64) + row0))
                if got is None:
                    got = np.zeros(len(key), dtype=bool)
                got[r[co]] = True
        return got

    def _flush(self) -> None:
        if self.buf:
            self.hist += np.bincount(np.concatenate(self.buf), minlength=len(self.hist))
            self.buf, self.nbuf = [], 0

    def end(self) -> None:
        """Narrow every histogrammed range to the bin holding its rank; finish the collected targets."""
        self._flush()
        for t in np.flatnonzero(self.mode == HIST).tolist():
            j = int(self.hj[t])
            counts = self.hist[j * self.bins:(j + 1) * self.bins]
            cum = np.cumsum(counts)
            if int(cum[-1]) != int(self.pop[t]):
                raise TableError(f"{self.origin} changed while it was being read; run select again")
            b = int(np.searchsorted(cum, self.rank[t], side="right"))
            self.rank[t] -= int(cum[b - 1]) if b else 0
            self.pop[t] = int(counts[b])
            sh = int(self.shift[t])
            lo = int(self.lo[t]) + (b << sh)
            hi = min(int(self.hi[t]), lo + (1 << sh) - 1)
            if self.phase[t] == KEY and lo == hi:  # the key is fixed: go on over the hash
                self.phase[t], self.fixed[t] = HASH, lo
                lo, hi = 0, (1 << 64) - 1
            self.lo[t], self.hi[t] = lo, hi
        coll = np.flatnonzero(self.mode == COLLECT)
        if len(coll):
            parts = list(zip(*self.got)) if self.got else [[], [], [], []]
            tt = np.concatenate(parts[0]) if self.got else np.zeros(0, np.intp)
            kk = np.concatenate(parts[1]) if self.got else np.zeros(0, np.uint64)
            hh = np.concatenate(parts[2]) if self.got else np.zeros(0, np.uint64)
            ii = np.concatenate(parts[3]) if self.got else np.zeros(0, np.int64)
            counts = np.bincount(tt, minlength=len(self.rank))
            start = np.cumsum(counts) - counts
            if (counts[coll] != self.pop[coll]).any():
                raise TableError(f"{self.origin} changed while it was being read; run select again")
            if int(kk.max(initial=0)) < (1 << 32) and len(self.rank) < (1 << 31):  # one sort of (target, key) ...
                order = np.argsort((tt.astype(np.uint64) << np.uint64(32)) | kk, kind="stable")
            else:
                order = np.lexsort((kk, tt))
            kstar = np.zeros(len(self.rank), dtype=np.uint64)
            kstar[coll] = kk[order[start[coll] + self.rank[coll]]]
            before = np.zeros(len(self.rank), dtype=np.int64)  # ... then only the rows tied with the key at the rank
            np.add.at(before, tt, kk < kstar[tt])
            tie = np.flatnonzero(kk == kstar[tt])
            sub = tie[np.lexsort((ii[tie], hh[tie], tt[tie]))]
            tc = np.bincount(tt[tie], minlength=len(self.rank))
            at = sub[(np.cumsum(tc) - tc)[coll] + self.rank[coll] - before[coll]]
            self.rk[coll], self.rh[coll], self.ri[coll] = kk[at], hh[at], ii[at]
            self.done[coll] = True
        self.got, self.hist, self.buf = [], np.zeros(0, dtype=np.int64), []


def above(key: np.ndarray, ids: np.ndarray, row: np.ndarray, rk: np.ndarray, rh: np.ndarray, ri: np.ndarray,
          seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, whether it comes after (``gt``) or is (``eq``) its target row ``(rk, rh, ri)`` in the
    order ``(key, mix64(sample_id, seed), row)``. The hash is computed only for rows tied on the key."""
    kk = key.astype(np.uint64)
    gt = kk > rk
    tie = np.flatnonzero(kk == rk)
    eq = np.zeros(len(kk), dtype=bool)
    if len(tie):
        h = mix64(ids[tie], seed)
        th, ti, tr = rh[tie], ri[tie], row[tie]
        gt[tie] = (h > th) | ((h == th) & (tr > ti))
        eq[tie] = (h == th) & (tr == ti)
    return gt, eq


class FirstHist:
    """The first histogram of the score's order key, taken in the counting pass (before the quotas,
    hence the targets, are known): per label slot (label + 1; one slot when ``per_label`` is off)
    ``bins`` ranges — the outer two open-ended, the others of one power-of-two width spanning the
    first batch's keys — so that ``narrow`` can start each ``RankSearch`` target in its bin and the
    counting pass doubles as the first histogram pass. Gives up (``ok`` False) on labels it cannot
    count densely; the search then starts from the whole range, as without it."""

    def __init__(self, slots: int, entries: int, key_bits: int, per_label: bool):
        self.per_label, self.key_bits = per_label, key_bits
        self.slots = max(1, slots if per_label else 1)
        self.bins = int(np.clip(entries // self.slots, 16, 1 << 16))
        self.limit = max(2 * entries, 16 * self.bins)  # slots × bins it may grow to (counts, and as many buffered)
        self.ok = self.slots * self.bins <= self.limit
        self.hist = np.zeros(self.slots * self.bins if self.ok else 0, dtype=np.int64)
        self.e0: int | None = None
        self.buf: list[np.ndarray] = []
        self.nbuf = 0

    def add(self, lab: np.ndarray, key: np.ndarray) -> None:
        """One batch of candidates: their labels and order keys."""
        if not self.ok or not len(key):
            return
        if self.e0 is None:  # the bins span the first batch's keys, widened by a quarter each side
            lo, hi = int(key.min()), int(key.max())
            pad = (hi - lo) // 4
            lo, hi = max(0, lo - pad), min((1 << self.key_bits) - 1, hi + pad)
            self.shift = max(0, (-(-(hi - lo + 1) // (self.bins - 2)) - 1).bit_length())
            self.e0 = lo
        b = self._bin(key)
        if self.per_label:
            if int(lab.min()) < -1 or int(lab.max()) >= DENSE_LABELS:
                self.ok = False
                return
            slot = lab.astype(np.int64) + 1
            top = int(slot.max()) + 1
            if top > self.slots:
                if top * self.bins > self.limit:
                    self.ok = False
                    return
                self._flush()
                self.hist = np.concatenate([self.hist, np.zeros((top - self.slots) * self.bins, dtype=np.int64)])
                self.slots = top
            b += slot * self.bins
        self.buf.append(b)
        self.nbuf += len(b)
        if self.nbuf >= max(FLUSH, len(self.hist)):
            self._flush()

    def _bin(self, key: np.ndarray) -> np.ndarray:
        if self.key_bits <= 32:
            d = key.astype(np.int64) - self.e0
            np.right_shift(d, self.shift, out=d, where=d >= 0)
            d += 1
            return np.clip(d, 0, self.bins - 1, out=d)
        k = key.astype(np.uint64)
        d = ((k - np.uint64(self.e0)) >> np.uint64(self.shift)).astype(np.int64)  # wraps below e0: caught next
        d = np.where((d < 0) | (d >= self.bins - 2), self.bins - 1, d + 1)
        d[k < np.uint64(self.e0)] = 0
        return d

    def _flush(self) -> None:
        if self.buf:
            self.hist += np.bincount(np.concatenate(self.buf), minlength=len(self.hist))
            self.buf, self.nbuf = [], 0

    def narrow(self, slot_rows: list[np.ndarray], rank: np.ndarray) -> tuple[np.ndarray, ...]:
        """Per target (its group's label slots, its rank in the group): the rank in its bin, the rows
        in the bin and the bin's key bounds."""
        self._flush()
        h = self.hist.reshape(self.slots, self.bins)
        n = len(rank)
        out_rank, pop = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        lo, hi = np.zeros(n, dtype=np.uint64), np.zeros(n, dtype=np.uint64)
        top = (1 << self.key_bits) - 1
        for t in range(n):
            counts = h[slot_rows[t]].sum(axis=0) if len(slot_rows[t]) != 1 else h[int(slot_rows[t][0])]
            cum = np.cumsum(counts)
            b = int(np.searchsorted(cum, rank[t], side="right"))
            out_rank[t] = int(rank[t]) - (int(cum[b - 1]) if b else 0)
            pop[t] = int(counts[b])
            start = 0 if b == 0 else self.e0 + ((b - 1) << self.shift)
            end = top if b == self.bins - 1 else min(top, self.e0 + (b << self.shift) - 1)
            lo[t], hi[t] = start, end
        return out_rank, pop, lo, hi
