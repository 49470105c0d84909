"""Stage 1 of `select`: read only the decision's columns and align every input on the base's rows.

``arrange_inputs`` picks the base (whose rows and locations the manifest is made of),
``resolve_metrics`` the columns to read, ``gather`` reads and joins them into numpy arrays, and
``candidates`` applies the filters (status, joins, NaN, duplicates, score bounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import SelectConfig
from ..errors import ConfigError, TableError
from ..tables import DEDUP_AUX, DEDUP_COLUMN, as_arrow, as_numpy
from .foreign import stems
from .inputs import Input, list_dataset, open_input
from .order import mean_rank
from .strategies import get_strategy, needs_score
from .tally import in_range


def _ok_mask(status: pa.ChunkedArray, reasons_too: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """status == "ok" as a numpy mask (nulls are not ok), plus counts of the other reasons (unless
    not ``reasons_too``: the streamed passes after the first)."""
    parts, reasons = [], {}
    for chunk in status.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = pc.dictionary_encode(pc.cast(chunk, pa.string()))
        dic = [chunk.dictionary[i].as_py() for i in range(len(chunk.dictionary))]
        ind = chunk.indices
        idx = (ind.to_numpy(zero_copy_only=False) if ind.null_count == 0 else
               as_numpy(pc.cast(ind, pa.int64()), fill=len(dic)).astype(np.intp, copy=False))  # null → len(dic)
        if reasons_too:
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


def _join_values(inp: Input, t: pa.Table, base: bool = False) -> pa.ChunkedArray | pa.Array:
    """The values ``inp`` joins on, from its own table or (``base``) from the base's columns."""
    if inp.join_on == ("name",):
        return stems(t.column("key")) if base else t.column("name")
    if inp.join_on == ("sample_id",):
        return pc.cast(t.column("sample_id"), pa.uint64())
    if inp.join_on == ("key",):
        return pc.cast(t.column("key"), pa.string())
    return pc.binary_join_element_wise(pc.cast(t.column("shard"), pa.string()), pc.cast(t.column("key"), pa.string()), "\x1f")


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
                   source_options: dict[str, Any] | None = None, *, direction: str = "higher-is-harder",
                   expect_rows: int | None = None) -> list[Input]:
    """Open the inputs; the first is the base whose rows (and locations) the manifest is made of: the
    first score table, else the --data listing, else the first foreign file (which has no locations)."""
    if not paths:
        raise ConfigError("no score inputs given")
    ins = [open_input(p, direction, expect_rows) for p in paths]
    tabs = [i for i in ins if i.kind == "table"]
    if data is not None:
        if tabs:
            raise ConfigError(f"--data is for foreign score files only; {tabs[0].path} already records its dataset")
        return [list_dataset(data, format, source_options)] + ins
    if tabs:
        return tabs[:1] + [i for i in ins if i is not tabs[0]]
    return ins


def resolve_metrics(cfg: SelectConfig, ins: list[Input]) -> tuple[list[str], dict[int, list[str]]]:
    """The metric(s) to select by, and the columns to read from each input (by ``id``)."""
    providers: dict[str, list[Input]] = {}
    for i in ins:
        for m in i.metrics:
            providers.setdefault(m, []).append(i)
    by = list(cfg.by)
    if not by and needs_score(cfg):
        choices = [m for m in providers if m not in DEDUP_AUX]
        declared = [m for m in choices if any(i.metrics[m].get("declared") for i in providers[m])]
        choices = declared or choices
        if len(choices) == 1:
            by = choices
        elif not choices:
            raise ConfigError("the inputs have no metric columns to select by"
                              + (" (or use --keep random)" if get_strategy(cfg.keep_mode).needs_score else ""))
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
    if cfg.dedup:
        having = [i for i in ins if DEDUP_COLUMN in i.columns]
        if not having:
            raise ConfigError(f"--dedup needs a dedup score table (column {DEDUP_COLUMN!r}); "
                              "run `dataprune score DATA --metric dedup` first")
        wants[id(having[0])].append(DEDUP_COLUMN)
    return by, wants


def _ids_from_keys(t: pa.Table) -> np.ndarray:
    """Ids for a foreign base without sample_id (a dry run): hashed from (shard, key) as tar and parquet
    sources do, or from the key alone as image folders do. Only used to break ties and draw randomly."""
    from ..ids import sample_id

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
    key_cols = [c for i in ins[1:] for c in (("key",) if i.join_on == ("name",) else i.join_on) if c != "sample_id"]
    key_cols += list(base.join_on)
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
            bv = as_arrow(ids) if other.join_on == ("sample_id",) else _join_values(other, bt, base=True)
            if other.join_on == ("key",) and pc.count_distinct(bv).as_py() != len(bv):
                raise ConfigError(f"{other.path} joins on 'key' alone, but keys repeat across shards in {base.path}; "
                                  "give the file a 'shard' (or 'sample_id') column")
            if other.join_on == ("name",) and pc.count_distinct(bv).as_py() != len(bv):
                raise ConfigError(f"{other.path} joins on file names, but {len(bv) - pc.count_distinct(bv).as_py()} keys of "
                                  f"{base.path} share their name without directory and extension; give the file a "
                                  "'key' (or 'sample_id') column")
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
        inside = in_range(score, cfg.min_score, cfg.max_score)
        if not inside.all():
            g.excluded["out_of_range"] = int(np.count_nonzero(~inside))
            mask = np.ones(n, dtype=bool) if mask is None else mask.copy()
            mask[mask] = inside
            score = score[inside]
    return mask, score
