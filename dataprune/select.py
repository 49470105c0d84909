"""Selection: score tables (ours or foreign) → the rows to keep → one parquet manifest for `export`.

The choosing is done by pure functions over numpy columns (``budget``, ``largest_remainder``,
``top_k_per_group``, ``ccs_strata``, ``ccs_allocate``, ``mean_rank``); ``plan_selection`` combines
them into one decision and ``run_select`` reads only the columns it needs, joins the inputs, and
streams the kept rows into the manifest.

Order and ties. Every metric column means *higher = harder*. Rows are ordered by
``(score, mix64(sample_id, seed))``: ``hard`` keeps the top of that order, ``easy`` the bottom,
``--drop-hardest``/``--ccs-beta`` remove the top, ``random`` keeps the smallest ``mix64`` values and
CCS samples inside each stratum the same way. So a selection depends only on
``(sample_id, score, seed)`` — never on row order, file order or the number of processes.

Memory stays columnar: a few numpy arrays of the table's length, no Python object per row.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ConfigError, TableError
from .ids import mix64
from .tables import (DEDUP_AUX, DEDUP_COLUMN, as_arrow, as_numpy, BASE_COLUMNS, LOCATION_COLUMNS, META_FILE, META_KEY, base_meta, done_name, done_parts, part_name,
                     read_table_meta)

KEEPS = ("hard", "easy", "random")
STRATEGIES = ("plain", "ccs")
QUOTAS = ("proportional", "equal")
JOINS = ("inner", "strict")
NAN_POLICIES = ("error", "drop")
COMBINED = "mean_rank"  # manifest column holding the combined score of `--by a,b`
FOREIGN_EXTS = (".csv", ".tsv", ".parquet")
ROW_GROUP = 1 << 20  # manifest rows per row group
PREFETCH_ROWS = 1_000_000  # rows of location columns decoded ahead while the choice is computed (~40 MB)
MANIFEST_READ = [c for c in LOCATION_COLUMNS if c != "sample_id"]  # read in stage 2; ids come from stage 1

# ------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class SelectConfig:
    by: tuple[str, ...] = ()  # metric column(s); empty = the only metric of the inputs
    keep: str | None = None  # hard | easy | random (None: hard; must stay None for --strategy ccs)
    frac: float | None = None
    count: int | None = None
    strategy: str = "plain"
    class_balanced: bool = False
    class_quota: str = "proportional"
    ccs_beta: float = 0.0
    ccs_strata: int = 50
    drop_hardest: float = 0.0
    dedup: bool = False
    min_score: float | None = None
    max_score: float | None = None
    nan: str = "error"
    join: str = "inner"
    seed: int = 0

    @property
    def keep_mode(self) -> str:
        return "ccs" if self.strategy == "ccs" else (self.keep or "hard")

    def validate(self) -> None:
        if (self.frac is None) == (self.count is None):
            raise ConfigError("give exactly one of --frac F (fraction of the rows to keep) or --count N")
        if self.frac is not None and not (isinstance(self.frac, (int, float)) and 0 < self.frac <= 1):
            raise ConfigError(f"--frac must be in (0, 1], not {self.frac}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"--count must be at least 1, not {self.count}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.keep is not None and self.keep not in KEEPS:
            raise ConfigError(f"--keep must be one of {', '.join(KEEPS)}, not {self.keep!r}")
        if self.strategy == "ccs" and self.keep is not None:
            raise ConfigError("--strategy ccs samples across score strata; leave out --keep")
        if self.strategy == "ccs" and self.drop_hardest:
            raise ConfigError("--strategy ccs drops the hardest rows with --ccs-beta; leave out --drop-hardest")
        if self.strategy != "ccs" and (self.ccs_beta or self.ccs_strata != 50):
            raise ConfigError("--ccs-beta and --ccs-strata need --strategy ccs")
        if self.class_quota not in QUOTAS:
            raise ConfigError(f"--class-quota must be one of {', '.join(QUOTAS)}, not {self.class_quota!r}")
        if self.class_quota != "proportional" and not self.class_balanced:
            raise ConfigError("--class-quota needs --class-balanced")
        if not 0 <= self.drop_hardest < 1:
            raise ConfigError(f"--drop-hardest must be in [0, 1), not {self.drop_hardest}")
        if not 0 <= self.ccs_beta < 1:
            raise ConfigError(f"--ccs-beta must be in [0, 1), not {self.ccs_beta}")
        if self.ccs_strata < 1:
            raise ConfigError(f"--ccs-strata must be at least 1, not {self.ccs_strata}")
        if self.nan not in NAN_POLICIES:
            raise ConfigError(f"--nan must be one of {', '.join(NAN_POLICIES)}, not {self.nan!r}")
        if self.join not in JOINS:
            raise ConfigError(f"--join must be one of {', '.join(JOINS)}, not {self.join!r}")
        for name, v in (("--min-score", self.min_score), ("--max-score", self.max_score)):
            if v is not None and math.isnan(v):
                raise ConfigError(f"{name} must be a number")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise ConfigError(f"--min-score {self.min_score} is above --max-score {self.max_score}")
        if len(set(self.by)) != len(self.by) or any(not b for b in self.by):
            raise ConfigError(f"--by lists each metric once, separated by commas (got {','.join(self.by)!r})")

    def needs_score(self) -> bool:
        return (self.keep_mode != "random" or self.drop_hardest > 0 or self.min_score is not None
                or self.max_score is not None or bool(self.by))


# ----------------------------------------------------------------------------------- pure functions


def budget(n: int, frac: float | None = None, count: int | None = None) -> int:
    """Rows to keep out of ``n``: ``count``, or ``frac * n`` rounded half up, computed exactly
    (``--frac 0.8`` of 10 rows is 8, of 5 rows 4, 0.25 of 2 rows is 1)."""
    if count is not None:
        return int(count)
    return int(Fraction(repr(float(frac))) * n + Fraction(1, 2))


def largest_remainder(total: int, weights, caps=None) -> np.ndarray:
    """Integer shares of ``total`` proportional to ``weights`` (Hamilton / largest remainder), each at
    most its cap, summing exactly to ``total``.

    Each share is the floor of its exact quota; the units left over go to the largest remainders
    (ties: larger weight, then lower index). A share above its cap is clamped and what it could not
    take is divided again among the others, so the total stays exact whenever ``total <= sum(caps)``.
    Exact integer arithmetic (Python ints): one entry per group, never per row.
    """
    w = [int(x) for x in np.asarray(weights).tolist()]
    cap = list(w) if caps is None else [int(x) for x in np.asarray(caps).tolist()]
    if any(x < 0 for x in w) or any(c < 0 for c in cap):
        raise ValueError("weights and caps must be non-negative")
    if total > sum(cap):
        raise ValueError(f"cannot place {total} in groups holding {sum(cap)}")
    out = [0] * len(w)
    active = [i for i in range(len(w)) if w[i] > 0 and cap[i] > 0]
    remaining = int(total)
    while remaining > 0:
        if not active:  # only zero-weight groups have room: fill them in index order
            for i in range(len(w)):
                take = min(cap[i] - out[i], remaining)
                out[i] += take
                remaining -= take
            break
        wsum = sum(w[i] for i in active)
        share = {i: remaining * w[i] // wsum for i in active}
        rem = {i: remaining * w[i] - share[i] * wsum for i in active}
        left = remaining - sum(share.values())
        for i in sorted(active, key=lambda i: (-rem[i], -w[i], i))[:left]:
            share[i] += 1
        over = [i for i in active if share[i] > cap[i] - out[i]]
        if not over:
            for i in active:
                out[i] += share[i]
            remaining = 0
            break
        for i in over:  # clamp, then divide the rest again among the others
            remaining -= cap[i] - out[i]
            out[i] = cap[i]
        active = [i for i in active if i not in set(over)]
    return np.asarray(out, dtype=np.int64)


def class_quotas(k: int, sizes, mode: str = "proportional", caps=None) -> np.ndarray:
    """Per-class quotas summing exactly to ``k``: proportional to class size, or equal (classes too
    small for an equal share keep everything and the rest is shared by the others)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    weights = sizes if mode == "proportional" else (sizes > 0).astype(np.int64)
    return largest_remainder(k, weights, sizes if caps is None else caps)


def order_key(score: np.ndarray) -> np.ndarray:
    """Unsigned integers that sort like the (NaN-free) float scores: uint32 for float32, else uint64."""
    ut, bits = (np.uint32, 31) if score.dtype == np.float32 else (np.uint64, 63)
    b = (np.asarray(score, dtype=np.float32 if ut is np.uint32 else np.float64) + 0).view(ut)  # + 0: -0.0 → 0.0
    m = b >> ut(bits)  # 1 for negatives
    np.negative(m, out=m)  # all ones for negatives (wraps), 0 otherwise
    m |= ut(1 << bits)
    m ^= b  # negatives: every bit flipped; others: sign bit set
    return m


def _counts(codes: np.ndarray | None, groups: int, n: int | None = None) -> np.ndarray:
    if codes is None:
        return np.array([n if n is not None else 0], dtype=np.int64)
    if codes.dtype != np.intp:  # bincount would copy to intp first; add.at counts in place
        out = np.zeros(groups, dtype=np.int64)
        np.add.at(out, codes, 1)
        return out
    return np.bincount(codes, minlength=groups).astype(np.int64)


def top_k_per_group(key: np.ndarray, quotas, ids: np.ndarray, seed: int, *, codes: np.ndarray | None = None,
                    largest: bool = True) -> np.ndarray:
    """Boolean mask keeping, in every group, exactly ``quotas[g]`` rows with the largest (or smallest)
    ``key``; equal keys are ordered by ``mix64(sample_id, seed)`` (a larger hash counts as larger).

    ``codes`` gives each row's group (0..G-1; None = one group). Cost: one sort of the keys (a
    partition for one group) plus work on the rows tied at each group's threshold.
    """
    n = len(key)
    quotas = np.asarray(quotas, dtype=np.int64)
    groups = len(quotas)
    counts = _counts(codes, groups, n)
    if (quotas > counts).any() or (quotas < 0).any():
        raise ValueError("a quota is larger than its group")
    keep = np.zeros(n, dtype=bool)
    if n == 0 or quotas.sum() == 0:
        return keep
    start = np.cumsum(counts) - counts
    live = quotas > 0
    pos = np.where(largest, counts - quotas, quotas - 1)  # threshold's place in ascending order within the group
    kmax = np.iinfo(key.dtype).max
    thr = np.full(groups, kmax if largest else 0, dtype=key.dtype)  # groups with quota 0 match nothing strictly
    if codes is None:
        p = int(pos[0])
        thr[0] = np.partition(key, p)[p]
        t = thr[0]
    elif key.dtype == np.uint32 and groups <= (1 << 32):
        comp = (codes.astype(np.uint64) << np.uint64(32)) | key
        comp.sort()
        thr[live] = (comp[start[live] + pos[live]] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        del comp
        t = thr[codes]
    else:
        order = np.lexsort((key, codes))
        thr[live] = key[order[start[live] + pos[live]]]
        del order
        t = thr[codes]
    strict = (key > t) if largest else (key < t)
    tie = key == t
    if codes is None:
        tie &= bool(live[0])
        need = quotas - np.count_nonzero(strict)
    else:
        tie &= live[codes]
        need = quotas - _counts(codes[strict], groups)
    del t
    keep |= strict
    tie_idx = np.flatnonzero(tie)
    del tie, strict
    tcodes = codes[tie_idx] if codes is not None else np.zeros(len(tie_idx), dtype=np.intp)
    tie_counts = _counts(tcodes, groups)
    if (tie_counts == need).all():  # every tied row is needed (the usual case for real-valued scores)
        keep[tie_idx] = True
        return keep
    h = mix64(ids[tie_idx], seed)
    order = np.lexsort((h, tcodes))
    sc = tcodes[order]
    rank = np.arange(len(order)) - (np.cumsum(tie_counts) - tie_counts)[sc]
    chosen = rank >= (tie_counts - need)[sc] if largest else rank < need[sc]
    keep[tie_idx[order[chosen]]] = True
    return keep


def random_key(ids: np.ndarray, seed: int) -> np.ndarray:
    """uint32 key for seeded uniform choice: the top bits of ``mix64(sample_id, seed)`` (ties in them
    are resolved by the full hash inside ``top_k_per_group``)."""
    return (mix64(ids, seed) >> np.uint64(32)).astype(np.uint32)


def mean_rank(columns: list[np.ndarray]) -> np.ndarray:
    """Combine metrics: each column's average rank (ties share their mean rank) scaled to [0, 1], then
    the mean over columns. Higher = harder, like every input."""
    n = len(columns[0])
    out = np.zeros(n, dtype=np.float64)
    for col in columns:
        _, inv, cnt = np.unique(col, return_inverse=True, return_counts=True)
        avg = (np.cumsum(cnt) - cnt) + (cnt - 1) / 2.0
        out += avg[inv.reshape(-1)] / max(n - 1, 1)
    return out / len(columns)


def ccs_strata(score: np.ndarray, codes: np.ndarray | None, groups: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split each group's score range into ``k`` equal-width strata: row → stratum in [0, k).

    Edges are ``lo + i * step`` with ``step = (hi - lo) / k``; stratum ``i`` is ``[edge_i, edge_i+1)``
    and the last one also holds ``hi`` (the released code gets the same by stretching ``hi`` by
    1.0001). A group whose scores are all equal is one stratum (the last). Returns strata, lo, step.
    """
    s = np.asarray(score, dtype=np.float64)
    c = codes if codes is not None else np.zeros(len(s), dtype=np.intp)
    lo = np.full(groups, np.inf)
    hi = np.full(groups, -np.inf)
    np.minimum.at(lo, c, s)
    np.maximum.at(hi, c, s)
    step = np.where(hi > lo, (hi - lo) / k, 0.0)
    lo_r, st_r = lo[c], step[c]
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(st_r > 0, np.floor((s - lo_r) / np.where(st_r > 0, st_r, 1.0)), k - 1)
    b = np.clip(b, 0, k - 1)
    b = np.where(s < lo_r + b * st_r, b - 1, b)  # agree exactly with the edges lo + i * step
    b = np.where((b < k - 1) & (st_r > 0) & (s >= lo_r + (b + 1) * st_r), b + 1, b)
    return np.clip(b, 0, k - 1).astype(np.intp), lo, step


def ccs_allocate(budgets, sizes) -> np.ndarray:
    """CCS budget split (Zheng et al., ICLR 2023, Algorithm 1): visit the strata from the smallest up
    (ties: lower index first); each gets ``min(size, remaining budget // strata left)``.

    ``sizes`` is (groups, strata), ``budgets`` one per group; vectorised over groups. The total is
    exact whenever a group's budget fits in its strata.
    """
    sizes = np.atleast_2d(np.asarray(sizes, dtype=np.int64))
    rest = np.array(budgets, dtype=np.int64).reshape(-1).copy()
    k = sizes.shape[1]
    order = np.argsort(sizes, axis=1, kind="stable")
    s = np.take_along_axis(sizes, order, axis=1)
    got = np.zeros_like(s)
    for i in range(k):
        cur = np.minimum(s[:, i], rest // (k - i))
        got[:, i] = cur
        rest -= cur
    out = np.zeros_like(got)
    np.put_along_axis(out, order, got, axis=1)
    return out


# ------------------------------------------------------------------------------------ the decision


@dataclass
class Selection:
    """What `plan_selection` decided: a mask over the candidate rows plus the plan shown to users."""

    keep: np.ndarray
    budget: int
    dropped_hardest: int = 0
    per_class: dict[str, list] | None = None  # label, candidates, kept, kept_min, kept_max (when labelled)
    strata: list[dict[str, Any]] | None = None


def _group_codes(labels: np.ndarray | None) -> tuple[np.ndarray | None, list]:
    """Dense-enough group codes for labels (int with -1 … for missing): (codes, label per code)."""
    if labels is None:
        return None, [None]
    lab = np.asarray(labels)
    valid = lab >= 0
    if len(lab) == 0:
        return np.zeros(0, dtype=np.int32), []
    hi = int(lab.max())
    if hi < (1 << 24):  # labels are class numbers: use them directly; missing → one more group
        has_missing = not bool(valid.all())
        codes = np.where(valid, lab, hi + 1).astype(np.int32) if has_missing else lab.astype(np.int32, copy=False)
        names: list = list(range(hi + 1)) + ([None] if has_missing else [])
        return codes, names
    u, inv = np.unique(lab, return_inverse=True)
    return inv.reshape(-1).astype(np.int32), [int(x) if x >= 0 else None for x in u]


def plan_selection(cfg: SelectConfig, ids: np.ndarray, score: np.ndarray | None, labels: np.ndarray | None) -> Selection:
    """Choose rows among the candidates. ``ids`` uint64, ``score`` float (higher = harder, NaN-free)
    or None for a pure random choice, ``labels`` int (-1 = missing) or None. Raises ConfigError when
    the request cannot be met."""
    n = len(ids)
    k = budget(n, cfg.frac, cfg.count)
    if cfg.count is not None and k > n:
        raise ConfigError(f"--count {k} is more than the {n} selectable rows")
    if k == 0:
        raise ConfigError(f"--frac {cfg.frac} of {n} selectable rows rounds to 0 rows")
    lab_codes, lab_names = _group_codes(labels)
    codes, names = (lab_codes, lab_names) if cfg.class_balanced else (None, [None])
    groups = len(names)
    sizes = _counts(codes, groups, n)
    mode = cfg.keep_mode
    beta = cfg.ccs_beta if mode == "ccs" else cfg.drop_hardest
    if score is None and (mode != "random" or beta > 0):
        raise ConfigError(f"--keep {mode} needs a score" if mode != "random" else "--drop-hardest needs a score (--by)")
    key = order_key(score) if score is not None and (mode in ("hard", "easy") or beta > 0) else None
    avail = np.ones(n, dtype=bool)
    dropped = 0
    if beta > 0:
        ndrop = np.array([int(Fraction(repr(float(beta))) * int(s)) for s in sizes], dtype=np.int64)  # floor(beta * n_g)
        if ndrop.sum():
            avail = ~top_k_per_group(key, ndrop, ids, cfg.seed, codes=codes, largest=True)
            dropped = int(ndrop.sum())
        eligible = sizes - ndrop
    else:
        eligible = sizes
    if k > eligible.sum():
        what = "--ccs-beta" if mode == "ccs" else "--drop-hardest"
        raise ConfigError(f"cannot keep {k} rows: only {int(eligible.sum())} of {n} remain after {what} {beta} "
                          f"drops the hardest {dropped}")
    if cfg.class_balanced:
        quotas = class_quotas(k, sizes, cfg.class_quota, caps=eligible)
    else:
        quotas = np.array([k], dtype=np.int64)
    idx = None if avail.all() else np.flatnonzero(avail)
    sub = (lambda a: a) if idx is None else (lambda a: a[idx])
    sel_ids = sub(ids)
    sel_codes = sub(codes) if codes is not None else None
    strata = None
    if mode in ("hard", "easy"):
        chosen = top_k_per_group(sub(key), quotas, sel_ids, cfg.seed, codes=sel_codes, largest=(mode == "hard"))
    elif mode == "random":
        chosen = top_k_per_group(random_key(sel_ids, cfg.seed), quotas, sel_ids, cfg.seed, codes=sel_codes, largest=False)
    else:
        chosen, strata = _ccs(cfg, sub(score), sel_ids, sel_codes, groups, quotas)
    if idx is None:
        keep = chosen
    else:
        keep = np.zeros(n, dtype=bool)
        keep[idx[chosen]] = True
    per_class = _class_stats(lab_codes, lab_names, keep, score) if labels is not None else None
    return Selection(keep=keep, budget=k, dropped_hardest=dropped, per_class=per_class, strata=strata)


def _class_stats(codes: np.ndarray, names: list, keep: np.ndarray, score: np.ndarray | None) -> dict[str, list]:
    """Per class (in label order; unlabelled last as None): candidates, kept and the kept score range."""
    g = len(names)
    cand = _counts(codes, g)
    kc = codes[keep]
    kept = _counts(kc, g)
    present = np.flatnonzero(cand)
    res: dict[str, list] = {"label": [names[i] for i in present.tolist()], "candidates": cand[present].tolist(),
                            "kept": kept[present].tolist()}
    if score is not None:
        ks = score[keep]
        lo = np.full(g, np.inf, dtype=ks.dtype)
        hi = np.full(g, -np.inf, dtype=ks.dtype)
        np.minimum.at(lo, kc, ks)
        np.maximum.at(hi, kc, ks)
        res["kept_min"] = [float(x) if np.isfinite(x) else None for x in lo[present].tolist()]
        res["kept_max"] = [float(x) if np.isfinite(x) else None for x in hi[present].tolist()]
    return res


def _ccs(cfg: SelectConfig, score: np.ndarray, ids: np.ndarray, codes: np.ndarray | None, groups: int,
         quotas: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
    k = cfg.ccs_strata
    strat, lo, step = ccs_strata(score, codes, groups, k)
    cell = strat if codes is None else codes.astype(np.intp) * k + strat
    sizes = np.bincount(cell, minlength=groups * k).reshape(groups, k)
    alloc = ccs_allocate(quotas, sizes)
    chosen = top_k_per_group(random_key(ids, cfg.seed), alloc.reshape(-1), ids, cfg.seed, codes=cell, largest=False)
    tot_sizes, tot_alloc = sizes.sum(axis=0), alloc.sum(axis=0)
    one = groups == 1
    plan = []
    for i in range(k):
        row = {"stratum": i, "rows": int(tot_sizes[i]), "kept": int(tot_alloc[i]),
               "fraction": round(float(tot_alloc[i]) / tot_sizes[i], 4) if tot_sizes[i] else None}
        if one and np.isfinite(lo[0]):
            row["lo"], row["hi"] = float(lo[0] + i * step[0]), float(lo[0] + (i + 1) * step[0])
        plan.append(row)
    return chosen, plan


# -------------------------------------------------------------------------------------------- inputs


@dataclass
class Input:
    """One SCORES argument: our score table (a directory), a foreign CSV/parquet file, or a dataset listing."""

    path: str
    kind: str  # "table" | "file" | "dataset"
    schema: pa.Schema
    metrics: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    table: pa.Table | None = None  # in memory: CSV files and dataset listings
    join_on: tuple[str, ...] = ("sample_id",)

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    @property
    def has_locations(self) -> bool:
        return self.kind in ("table", "dataset")

    def read(self, columns: list[str]) -> pa.Table:
        """Only these columns, every row, in order."""
        if self.table is not None:
            return self.table.select(columns)
        parts = list(self.pieces(columns))
        try:
            return pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        except pa.ArrowInvalid as e:
            raise TableError(f"{self.path}: parts disagree on their columns ({e})") from None

    def num_rows(self) -> int:
        if self.table is not None:
            return self.table.num_rows
        from concurrent.futures import ThreadPoolExecutor

        import pyarrow.parquet as pq

        def rows(f: str) -> int:
            try:
                return pq.ParquetFile(f).metadata.num_rows
            except (OSError, pa.ArrowInvalid) as e:
                raise TableError(f"{f}: not a readable parquet file ({e})") from None

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            return sum(pool.map(rows, self.files))

    def pieces(self, columns: list[str], ahead: int | None = None) -> "Pieces":
        """The rows file by file, in order (see ``Pieces``). Reading starts at once."""
        return Pieces(self, columns, ahead)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        if self.kind == "table":
            with open(os.path.join(self.path, META_FILE), "rb") as f:
                h.update(f.read())
            for i in sorted(done_parts(self.path)):
                with open(os.path.join(self.path, done_name(i)), "rb") as f:
                    h.update(part_name(i).encode() + b"\0" + f.read())
                h.update(str(os.path.getsize(os.path.join(self.path, part_name(i)))).encode())
        elif self.kind == "file":
            with open(self.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(json.dumps(self.meta.get("source"), sort_keys=True).encode())
            h.update(str(self.table.num_rows if self.table is not None else 0).encode())
        return h.hexdigest()[:16]


class Pieces:
    """Iterate an input's rows as Arrow tables, one per part file, in table order. Files are decoded
    on a thread pool as soon as this object exists, at most ``ahead`` of them held besides the one in
    use, so a caller can start the reading of columns it needs later (stage 2) before a computation.
    (pyarrow.dataset is not used: the order of its batches is not part of its contract.)"""

    def __init__(self, inp: Input, columns: list[str], ahead: int | None = None):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.inp, self.columns = inp, columns
        self.pool = None
        self.todo: deque = deque()
        if inp.table is not None:
            return
        workers = min(8, os.cpu_count() or 1)
        self.inner = len(inp.files) < workers  # few big files: let each read use threads itself
        self.files = iter(inp.files)
        self.pool = ThreadPoolExecutor(workers)
        for f in itertools.islice(self.files, max(ahead or 0, 2 * workers)):
            self.todo.append(self.pool.submit(_read_parquet, f, columns, self.inner))

    def __iter__(self) -> Iterator[pa.Table]:
        if self.pool is None:
            yield self.inp.table.select(self.columns)
            return
        try:
            while self.todo:
                t = self.todo.popleft().result()
                nxt = next(self.files, None)
                if nxt is not None:
                    self.todo.append(self.pool.submit(_read_parquet, nxt, self.columns, self.inner))
                yield t
        finally:
            self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.todo.clear()


def _read_parquet(path: str, columns: list[str], threads: bool) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).read(columns=columns, use_threads=threads)
    except (OSError, pa.ArrowInvalid, KeyError) as e:
        raise TableError(f"{path}: cannot read columns {', '.join(columns)} ({e})") from None


def _is_metric_type(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def open_input(path: str) -> Input:
    """Recognise one SCORES argument (our table directory, or a foreign CSV/TSV/parquet file)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(path) and os.path.exists(os.path.join(parent, META_FILE)):
        raise ConfigError(f"{path} is one part of the score table {parent}: pass the table's directory instead")
    if os.path.isdir(path):
        meta = read_table_meta(path)
        parts = sorted(done_parts(path))
        if not parts:
            raise TableError(f"{path}: the score table has no finished parts")
        files = [os.path.join(path, part_name(i)) for i in parts]
        import pyarrow.parquet as pq

        try:
            schema = pq.read_schema(files[0])
        except (OSError, pa.ArrowInvalid) as e:
            raise TableError(f"{files[0]}: not a readable parquet file ({e})") from None
        missing = [c for c in ("sample_id", "shard", "key", "label", "loc_path", "loc_offset", "loc_size", "status")
                   if c not in schema.names]
        if missing:
            raise TableError(f"{path}: not a dataprune score table (parts lack {', '.join(missing)})")
        declared = meta.get("metrics") or {}
        metrics: dict[str, dict[str, Any]] = {}
        for f in schema:  # declared metric columns, and any other float column (usable with --by)
            if f.name in BASE_COLUMNS or f.name.endswith("_std") or f.name == DEDUP_COLUMN:
                continue
            if f.name in declared:
                metrics[f.name] = {**declared[f.name], "declared": True}
            elif pa.types.is_floating(f.type):
                metrics[f.name] = {"declared": False}
        bad = [m for m, info in metrics.items() if info.get("direction", "higher = harder") != "higher = harder"]
        if bad:
            raise TableError(f"{path}: metric(s) {', '.join(bad)} are not 'higher = harder' in {META_FILE}")
        return Input(path=path, kind="table", schema=schema, metrics=metrics, meta=meta, files=files)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file or directory")
    low = path.lower()
    if not low.endswith(FOREIGN_EXTS):
        raise ConfigError(f"{path}: a score input is a score table directory or a {'/'.join(FOREIGN_EXTS)} file")
    table = None
    try:
        if low.endswith(".parquet"):
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
        else:
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path, parse_options=pcsv.ParseOptions(delimiter="\t" if low.endswith(".tsv") else ","),
                                  convert_options=pcsv.ConvertOptions(column_types={
                                      "sample_id": pa.uint64(), "key": pa.string(), "shard": pa.string(), "label": pa.int32()}))
            schema = table.schema
    except (OSError, pa.ArrowInvalid) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    names = schema.names
    if "sample_id" in names:
        join_on: tuple[str, ...] = ("sample_id",)
    elif "key" in names and "shard" in names:
        join_on = ("shard", "key")
    elif "key" in names:
        join_on = ("key",)
    else:
        raise ConfigError(f"{path}: needs a 'sample_id' or 'key' column to join on (has: {', '.join(names)})")
    skip = set(BASE_COLUMNS) | {"sample_id", "shard", "key", "label"}
    metrics = {f.name: {"direction": "higher = harder (assumed)", "declared": True} for f in schema if _is_metric_type(f.type)
               and f.name not in skip and not f.name.endswith("_std")}
    return Input(path=path, kind="file", schema=schema, metrics=metrics, files=[path], table=table, join_on=join_on)


def list_dataset(data: str, format: str | None = None, source_options: dict[str, Any] | None = None) -> Input:
    """Every sample of a dataset (ids, labels, locations, status), for foreign scores that lack locations.
    Streams the whole dataset once; a score table is much faster when you have one."""
    from collections import Counter

    from .errors import SourceError
    from .sources import open_source
    from .tables import RowBuffer

    source = open_source(data, format, **(source_options or {}))
    buf = RowBuffer()
    skipped: Counter = Counter()
    try:
        for shard in source.list_shards():
            try:
                for s in source.iter_samples(shard):
                    buf.add(s)
            except SourceError as e:
                skipped[e.reason] += 1
    finally:
        source.close()
    table = buf.table()
    meta = {"source": source.spec(), "classes": source.classes, "shard_errors": dict(skipped)}
    return Input(path=data, kind="dataset", schema=table.schema, metrics={}, meta=meta, table=table)


# ------------------------------------------------------------------------------------------- reading


def _ok_mask(status: pa.ChunkedArray) -> tuple[np.ndarray, dict[str, int]]:
    """status == "ok" as a numpy mask (nulls are not ok), plus counts of the other reasons."""
    parts, reasons = [], {}
    for chunk in status.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = pc.dictionary_encode(pc.cast(chunk, pa.string()))
        dic = [chunk.dictionary[i].as_py() for i in range(len(chunk.dictionary))]
        idx = as_numpy(pc.cast(chunk.indices, pa.int64()), fill=len(dic)).astype(np.intp, copy=False)  # null → len(dic)
        counts = np.bincount(idx, minlength=len(dic) + 1)
        for name, c in zip(dic + ["null"], counts.tolist()):
            if c and name != "ok":
                reasons[name] = reasons.get(name, 0) + c
        parts.append(idx == dic.index("ok") if "ok" in dic else np.zeros(len(chunk), dtype=bool))
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=bool)), reasons


def _floats(col: pa.ChunkedArray) -> np.ndarray:
    """A metric column as float32 (kept as is) or float64 (anything else); nulls become NaN."""
    target = pa.float32() if col.type == pa.float32() else pa.float64()
    return as_numpy(col if col.type == target else pc.cast(col, target), fill=np.nan)


def _join_values(inp: Input, t: pa.Table) -> pa.ChunkedArray | pa.Array:
    if inp.join_on == ("sample_id",):
        return pc.cast(t.column("sample_id"), pa.uint64())
    if inp.join_on == ("key",):
        return pc.cast(t.column("key"), pa.string())
    return pc.binary_join_element_wise(pc.cast(t.column("shard"), pa.string()), pc.cast(t.column("key"), pa.string()), "\x1f")


# ------------------------------------------------------------------------------------------ driver


@dataclass
class Gathered:
    """Stage 1: the decision's columns, aligned on the base input's rows (numpy, one entry per row)."""

    ids: np.ndarray  # uint64
    alive: np.ndarray  # bool: status ok everywhere, present in every input
    labels: np.ndarray | None  # int32, -1 = unlabelled; None when the base has no labels
    cols: dict[str, np.ndarray]  # metric → float32/float64 (NaN = missing)
    dup: np.ndarray | None  # bool is_duplicate (--dedup)
    excluded: dict[str, int]  # reason → rows taken out of the candidates
    joins: list[dict[str, Any]]  # per joined input: rows, missing, extra


def arrange_inputs(paths: list[str], data: str | None = None, format: str | None = None,
                   source_options: dict[str, Any] | None = None) -> list[Input]:
    """Open the inputs; the first is the base whose rows (and locations) the manifest is made of: the
    first score table, else the --data listing, else the first foreign file (which has no locations)."""
    if not paths:
        raise ConfigError("no score inputs given")
    ins = [open_input(p) for p in paths]
    tabs = [i for i in ins if i.kind == "table"]
    if data is not None:
        if tabs:
            raise ConfigError(f"--data is for foreign score files only; {tabs[0].path} already records its dataset")
        return [list_dataset(data, format, source_options)] + ins
    if tabs:
        return tabs[:1] + [i for i in ins if i is not tabs[0]]
    return ins


def resolve_metrics(cfg: SelectConfig, ins: list[Input]) -> tuple[list[str], dict[int, list[str]], Input | None]:
    """The metric(s) to select by, the columns to read from each input (by ``id``), and the dedup input."""
    providers: dict[str, list[Input]] = {}
    for i in ins:
        for m in i.metrics:
            providers.setdefault(m, []).append(i)
    by = list(cfg.by)
    if not by and cfg.needs_score():
        choices = [m for m in providers if m not in DEDUP_AUX]
        declared = [m for m in choices if any(i.metrics[m].get("declared") for i in providers[m])]
        choices = declared or choices
        if len(choices) == 1:
            by = choices
        elif not choices:
            raise ConfigError("the inputs have no metric columns to select by"
                              + (" (or use --keep random)" if cfg.keep_mode != "random" else ""))
        else:
            raise ConfigError(f"the inputs have several metrics ({', '.join(choices)}); choose one with --by "
                              f"(or combine them by mean rank: --by {','.join(choices[:2])})")
    for m in by:
        if m not in providers:
            raise ConfigError(f"unknown metric {m!r}; available: {', '.join(providers) or 'none'}")
        if len(providers[m]) > 1:
            raise ConfigError(f"metric {m!r} is in more than one input ({', '.join(i.path for i in providers[m])}); "
                              "pass only one of them")
    wants: dict[int, list[str]] = {id(i): [] for i in ins}
    for m in by:
        wants[id(providers[m][0])].append(m)
    dedup_from = None
    if cfg.dedup:
        having = [i for i in ins if DEDUP_COLUMN in i.columns]
        if not having:
            raise ConfigError(f"--dedup needs a dedup score table (column {DEDUP_COLUMN!r}); "
                              "run `dataprune score DATA --metric dedup` first")
        dedup_from = having[0]
        wants[id(dedup_from)].append(DEDUP_COLUMN)
    return by, wants, dedup_from


def _ids_from_keys(t: pa.Table) -> np.ndarray:
    """Ids for a foreign base without sample_id (a dry run): hashed from (shard, key) as tar and parquet
    sources do, or from the key alone as image folders do. Only used to break ties and draw randomly."""
    from .ids import sample_id

    keys = pc.cast(t.column("key"), pa.string()).to_pylist()
    shards = pc.cast(t.column("shard"), pa.string()).to_pylist() if "shard" in t.column_names else [""] * len(keys)
    return np.fromiter((sample_id(s or "", k) for s, k in zip(shards, keys)), dtype=np.uint64, count=len(keys))


def _read_base(base: Input, columns: list[str], keep_arrow: list[str]) -> tuple[dict[str, np.ndarray], pa.Table, dict]:
    """The base's decision columns as numpy arrays (status → ok mask, label → int32 with -1 for
    missing, metrics → floats). Each part is copied into preallocated arrays as soon as it is decoded
    (while the next parts are being decoded) and then dropped, so memory holds the arrays plus a few
    parts. ``keep_arrow`` columns (join keys) are also returned as an Arrow table."""
    from collections import Counter

    n = base.num_rows()
    types = {f.name: f.type for f in base.schema}
    dtypes = {"sample_id": np.uint64, "status": bool, "label": np.int32, DEDUP_COLUMN: bool}
    out = {c: np.empty(n, dtype=dtypes.get(c, np.float32 if types[c] == pa.float32() else np.float64))
           for c in columns if c not in keep_arrow}
    arrow: list[pa.Table] = []
    reasons: Counter = Counter()
    label_nulls = off = 0
    for t in base.pieces(columns):
        m = t.num_rows
        if off + m > n:
            raise TableError(f"{base.path} changed while it was being read; run select again")
        for c, dest in out.items():
            col = t.column(c)
            if c == "sample_id":
                a = as_numpy(pc.cast(col, pa.uint64()))
            elif c == "status":
                a, r = _ok_mask(col)
                reasons.update(r)
            elif c == "label":
                label_nulls += col.null_count
                a = as_numpy(col if col.type == pa.int32() else pc.cast(col, pa.int32()), fill=-1)
            elif c == DEDUP_COLUMN:
                a = as_numpy(col, fill=False)
            else:
                a = _floats(col)
            dest[off:off + m] = a
        if keep_arrow:
            arrow.append(t.select(keep_arrow))
        off += m
    if off != n:
        raise TableError(f"{base.path} changed while it was being read; run select again")
    if "label" in out and label_nulls == n:
        del out["label"]  # no labels at all
    bt = pa.concat_tables(arrow) if arrow else pa.table({})
    if "sample_id" not in out:
        out["sample_id"] = _ids_from_keys(bt) if n else np.zeros(0, dtype=np.uint64)
    return out, bt, dict(reasons)


def gather(cfg: SelectConfig, ins: list[Input], wants: dict[int, list[str]]) -> Gathered:
    """Read only the columns the decision needs and align every input on the base's rows."""
    base = ins[0]
    key_cols = [c for i in ins[1:] for c in i.join_on if c != "sample_id"] + list(base.join_on)
    bcols = [c for c in ["sample_id", "label", "status"] + key_cols + wants[id(base)] if c in base.columns]
    arrow_keys = [c for c in dict.fromkeys(key_cols) if c != "sample_id" and c in base.columns]
    arrays, bt, reasons = _read_base(base, list(dict.fromkeys(bcols)), arrow_keys)
    ids = arrays["sample_id"]
    n = len(ids)
    if n == 0:
        raise TableError(f"{base.path}: no rows")
    excluded = {f"status:{r}": c for r, c in reasons.items()}
    alive = arrays.get("status", np.ones(n, dtype=bool))
    labels = arrays.get("label")
    cols = {c: arrays[c] for c in wants[id(base)] if c != DEDUP_COLUMN}
    dup = arrays.get(DEDUP_COLUMN)
    joins: list[dict[str, Any]] = []
    base_keys: dict[tuple[str, ...], Any] = {}
    for other in ins[1:]:
        ocols = list(other.join_on) + (["status"] if other.kind == "table" else []) + wants[id(other)]
        ot = other.read(list(dict.fromkeys(ocols)))
        ovals = _join_values(other, ot)
        distinct = pc.count_distinct(ovals).as_py()
        if distinct != len(ovals):
            raise TableError(f"{other.path}: {len(ovals) - distinct} duplicate {'/'.join(other.join_on)} values; "
                             "each sample may appear once")
        if other.join_on not in base_keys:
            bv = as_arrow(ids) if other.join_on == ("sample_id",) else _join_values(other, bt)
            if other.join_on == ("key",) and pc.count_distinct(bv).as_py() != len(bv):
                raise ConfigError(f"{other.path} joins on 'key' alone, but keys repeat across shards in {base.path}; "
                                  "give the file a 'shard' (or 'sample_id') column")
            base_keys[other.join_on] = bv
        pos = pc.index_in(base_keys[other.join_on], value_set=ovals)
        matched = as_numpy(pos.is_valid()) if pos.null_count else np.ones(n, dtype=bool)
        posn = as_numpy(pos, fill=0).astype(np.intp)
        found = np.zeros(len(ovals), dtype=bool)
        found[posn[matched]] = True
        missing = int(np.count_nonzero(alive & ~matched))
        extra = int(len(ovals) - np.count_nonzero(found))
        joins.append({"input": other.path, "on": "/".join(other.join_on), "rows": len(ovals), "missing": missing,
                      "extra": extra})
        if cfg.join == "strict" and (missing or extra):
            raise TableError(f"--join strict: {missing} selectable rows of {base.path} are missing from {other.path} "
                             f"and {extra} of its rows are not in {base.path}")
        if missing:
            excluded[f"missing:{other.path}"] = missing
        alive &= matched
        if "status" in ot.column_names:
            bad = alive & ~_ok_mask(ot.column("status"))[0][posn]
            if bad.any():
                excluded[f"status:{other.path}"] = int(np.count_nonzero(bad))
                alive &= ~bad
        for c in wants[id(other)]:
            if c == DEDUP_COLUMN:
                dup = np.where(matched, as_numpy(ot.column(c), fill=False)[posn], False)
            else:
                v = _floats(ot.column(c))[posn]
                v[~matched] = np.nan
                cols[c] = v
    return Gathered(ids=ids, alive=alive, labels=labels, cols=cols, dup=dup, excluded=excluded, joins=joins)


def candidates(cfg: SelectConfig, g: Gathered, by: list[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Rows that may be chosen: ok, joined, scored (or --nan drop), not duplicates, inside the score
    bounds. Returns them as a mask over the base rows (None = every row) and their selection score
    (None without --by); counts what was taken out in ``g.excluded``."""
    alive, n = g.alive, len(g.ids)
    if by:
        nan = np.zeros(n, dtype=bool)
        for m in by:
            nan |= np.isnan(g.cols[m])
        bad = int(np.count_nonzero(alive & nan))
        if bad:
            if cfg.nan == "error":
                raise TableError(f"{bad} selectable rows have no score (NaN or missing) in {', '.join(by)}; "
                                 "pass --nan drop to leave them out")
            g.excluded["nan"] = bad
            alive = alive & ~nan
    if g.dup is not None:
        g.excluded["duplicate"] = int(np.count_nonzero(alive & g.dup))
        alive = alive & ~g.dup
    mask = None if alive.all() else alive
    take = (lambda a: a) if mask is None else (lambda a: a[mask])
    score = None
    if len(by) == 1:
        score = take(g.cols[by[0]])
    elif by:
        score = mean_rank([take(g.cols[m]) for m in by])
    if score is not None and (cfg.min_score is not None or cfg.max_score is not None):
        inside = np.ones(len(score), dtype=bool)
        if cfg.min_score is not None:
            inside &= score >= cfg.min_score
        if cfg.max_score is not None:
            inside &= score <= cfg.max_score
        if not inside.all():
            g.excluded["out_of_range"] = int(np.count_nonzero(~inside))
            mask = np.ones(n, dtype=bool) if mask is None else mask.copy()
            mask[mask] = inside
            score = score[inside]
    return mask, score


def run_select(inputs: list[str], cfg: SelectConfig, out: str | None = None, *, data: str | None = None,
               format: str | None = None, source_options: dict[str, Any] | None = None,
               dry_run: bool = False) -> dict[str, Any]:
    """Read the inputs, choose the rows and (unless ``dry_run``) write the manifest. Returns the summary."""
    import time

    t0 = time.perf_counter()
    cfg.validate()
    ins = arrange_inputs(inputs, data, format, source_options)
    base = ins[0]
    if not dry_run:
        if out is None:
            raise ConfigError("--out is required")
        if os.path.isdir(out):
            raise ConfigError(f"--out {out} is a directory; give the manifest's file name (e.g. {os.path.join(out, 'manifest.parquet')})")
        real_out = os.path.realpath(out)
        for i in ins:
            rp = os.path.realpath(i.path)
            if real_out == rp or real_out.startswith(rp.rstrip(os.sep) + os.sep):
                raise ConfigError(f"--out {out} would overwrite or go inside the input {i.path}")
        if not base.has_locations:
            raise ConfigError(f"{base.path} has scores but no sample locations, so its manifest could not be exported; "
                              "also pass a score table of the same dataset, or --data DATASET (--dry-run shows the plan)")
        if not base.meta.get("source"):
            raise TableError(f"{base.path}: {META_FILE} records no source dataset, so a manifest could not be exported")
    by, wants, _ = resolve_metrics(cfg, ins)
    g = gather(cfg, ins, wants)
    cmask, score = candidates(cfg, g, by)
    take = (lambda a: a) if cmask is None else (lambda a: a[cmask])
    cand_ids = take(g.ids)
    cand_labels = take(g.labels) if g.labels is not None else None
    ncand = len(cand_ids)
    why = f" (excluded: {_fmt_counts(g.excluded)})" if any(g.excluded.values()) else ""
    if ncand == 0:
        raise TableError("no selectable rows left" + why)
    if cfg.class_balanced and (cand_labels is None or not (cand_labels >= 0).any()):
        raise ConfigError(f"--class-balanced needs labels, but {base.path} has none")
    if cfg.count is not None and cfg.count > ncand:
        raise ConfigError(f"--count {cfg.count} is more than the {ncand} selectable rows{why}")
    stage2 = None
    if not dry_run and base.kind == "table":  # decode the manifest's columns while the choice is computed
        per_file = max(1, len(g.ids) // max(1, len(base.files)))
        stage2 = base.pieces(MANIFEST_READ, ahead=PREFETCH_ROWS // per_file)
    try:
        sel = plan_selection(cfg, cand_ids, score, cand_labels)
        keep_full = sel.keep
        if cmask is not None:
            keep_full = np.zeros(len(g.ids), dtype=bool)
            keep_full[cmask] = sel.keep
        summary = _summary(cfg, base, g, by, sel, score)
        inputs_meta = [{"path": os.path.abspath(i.path), "kind": i.kind, "fingerprint": i.fingerprint(),
                        "metrics": sorted(i.metrics)} for i in ins]
        result: dict[str, Any] = {"summary": summary, "config": _params(cfg, by), "inputs": inputs_meta, "out": None,
                                  "dry_run": dry_run}
        if not dry_run:
            score_cols: dict[str, np.ndarray] = {m: g.cols[m] for m in by}
            if len(by) > 1:
                full = np.full(len(g.ids), np.nan)
                full[keep_full] = score[sel.keep]
                score_cols[COMBINED] = full
            selection = {**result["config"], "summary": summary, "inputs": inputs_meta}
            meta = base_meta("manifest", base.meta.get("source"), base.meta.get("classes"), selection=selection,
                             rows=summary["kept"])
            _write_manifest(out, base, g.ids, keep_full, score_cols, meta, stage2 or base.pieces(MANIFEST_READ))
            result["out"] = out
    finally:
        if stage2 is not None:
            stage2.close()
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _summary(cfg: SelectConfig, base: Input, g: Gathered, by: list[str], sel: Selection,
             score: np.ndarray | None) -> dict[str, Any]:
    kept = int(np.count_nonzero(sel.keep))
    ncand = len(sel.keep)
    summary: dict[str, Any] = {
        "rows": len(g.ids), "candidates": ncand, "excluded": {k: v for k, v in g.excluded.items() if v},
        "budget": sel.budget, "kept": kept, "dropped": ncand - kept, "dropped_hardest": sel.dropped_hardest,
        "by": by, "score": COMBINED if len(by) > 1 else (by[0] if by else None), "joins": g.joins,
    }
    if score is not None:
        ks = score[sel.keep]
        summary["score_range"] = {"candidates": [float(score.min()), float(score.max())],
                                  "kept": [float(ks.min()), float(ks.max())]}
    if sel.per_class is not None:
        classes = base.meta.get("classes") or []
        pc_ = dict(sel.per_class)
        pc_["name"] = [classes[x] if x is not None and 0 <= x < len(classes) else None for x in pc_["label"]]
        summary["per_class"] = pc_
    if sel.strata is not None:
        summary["strata"] = sel.strata
    if base.kind == "table":
        summary["parts"] = {"finished": len(base.files), "shards": len(base.meta.get("shards") or [])}
    return summary


def _params(cfg: SelectConfig, by: list[str]) -> dict[str, Any]:
    p = asdict(cfg)
    p["by"] = by
    p["keep"] = cfg.keep_mode
    return p


def _fmt_counts(d: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _write_manifest(out: str, base: Input, ids: np.ndarray, keep: np.ndarray, score_cols: dict[str, np.ndarray],
                    meta: dict[str, Any], pieces: Pieces) -> None:
    """Stream the kept rows into ``out`` (a temporary name, renamed into place when complete): the
    location columns are read now, part by part in table order; ``sample_id`` and the scores come
    from the arrays already in memory. Row groups are written on a background thread (the parquet
    writer releases the GIL) while the next parts are read and filtered."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    read_cols = MANIFEST_READ
    types = {f.name: f.type for f in base.schema}
    fields = [pa.field("sample_id", pa.uint64(), nullable=False)] + [pa.field(c, types[c]) for c in read_cols]
    fields += [pa.field(m, pa.from_numpy_dtype(a.dtype)) for m, a in score_cols.items()]
    schema = pa.schema(fields, metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str).encode()})
    d = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", suffix=".tmp", dir=d)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    writer = None
    try:
        # snappy: every parquet reader has it, and zstd costs ~50 % more CPU here for ~25 % less disk;
        # ids (hashes) and float scores do not compress, so they are stored plain
        comp = {f.name: "none" if f.name == "sample_id" or f.name in score_cols else "snappy" for f in fields}
        writer = pq.ParquetWriter(tmp, schema, compression=comp, use_dictionary=["shard", "loc_path", "label"],
                                  column_encoding={"loc_offset": "DELTA_BINARY_PACKED"},
                                  write_statistics=["label"] + list(score_cols))
        with ThreadPoolExecutor(1) as bg:
            pending: list[pa.Table] = []
            npending = off = 0
            writing = None
            for piece in pieces:
                m = piece.num_rows
                if off + m > len(ids):
                    raise TableError(f"{base.path} changed while it was being read; run select again")
                mask = keep[off:off + m]
                kept = int(np.count_nonzero(mask))
                if kept:
                    pm = as_arrow(mask)
                    arrays = [as_arrow(ids[off:off + m][mask])]
                    arrays += [c.filter(pm) if kept < m else c for c in piece.columns]
                    arrays += [as_arrow(a[off:off + m][mask]) for a in score_cols.values()]
                    pending.append(pa.Table.from_arrays(arrays, schema=schema))
                    npending += kept
                off += m
                if npending >= ROW_GROUP:
                    if writing is not None:
                        writing.result()  # at most one row group in flight: memory stays bounded
                    writing = bg.submit(_write_group, writer, pending)
                    pending, npending = [], 0
            if writing is not None:
                writing.result()
            if off != len(ids):
                raise TableError(f"{base.path} changed while it was being read; run select again")
            if pending:
                _write_group(writer, pending)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_group(writer, pieces: list[pa.Table]) -> None:
    # One dictionary per column for the whole row group: with a different dictionary per chunk (each
    # part has its own) the parquet writer falls back to plain strings, ~5× slower and far larger.
    writer.write_table(pa.concat_tables(pieces).unify_dictionaries(), row_group_size=ROW_GROUP)


__all__ = ["SelectConfig", "Selection", "budget", "largest_remainder", "class_quotas", "order_key", "top_k_per_group",
           "random_key", "mean_rank", "ccs_strata", "ccs_allocate", "plan_selection", "open_input", "run_select"]
