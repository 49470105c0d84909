"""Keeper rules for duplicate groups: which copies stay (used by :mod:`dataprune.metrics.dedup`).

Keeper order (``keep``; ties → lower ``sample_id``, or lower row without ids):

- ``"easy"``: the lowest score first — by default the cosine distance to its cluster's centroid, i.e.
  the most prototypical copy.
- ``"hard"`` (the default): the highest score first (the farthest from the centroid, as SemDeDup).
- ``"random"``: the lowest ``dataprune.ids.mix64(sample_id, seed)`` first: seeded, and independent of
  row order when ``sample_ids`` are given.
- ``"first"`` (exact groups only, not an option): the lowest ``sample_id`` first.

Semantic rules (``rule``), all inside one k-means cluster, "similar" meaning cosine ≥ ``1 - eps``:

- ``"greedy"`` (the default): visit the rows in keeper order; keep a row unless it is similar to a row
  already kept. Every removed row then has a kept near-copy (no orphans, by construction); its
  ``dup_group`` is the group of its most similar earlier *kept* row.
- ``"semdedup"``: SemDeDup's released rule: remove a row when *any* earlier row in keeper order has
  cosine strictly ``>`` ``1 - eps`` with it, kept or not. Its ``dup_group`` is the group of its most
  similar earlier row (so, following the chain, of one kept row). Removes at most as many as
  ``"components"``, but a removed row's kept copy may not be similar to it.
- ``"components"``: connected groups of similar pairs, one keeper per group (:func:`choose_keepers`).

With ``greedy``/``semdedup`` a group is one kept row plus the rows attached to it. Both are one pass
over the cluster's upper triangle in keeper order, in ``block x block`` tiles (the same tiles and
memory bound as ``components``); ``greedy`` resolves each diagonal tile row by row in keeper order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import DEDUP_KEEPS, DEDUP_RULES
from ..errors import ConfigError
from ..ids import mix64
from .kmeans import load_rows

KEEP_POLICIES = DEDUP_KEEPS + ("first",)  # "first": exact groups (not an option)
RULES = DEDUP_RULES


def check_keep(keep: str) -> None:
    if keep not in KEEP_POLICIES:
        raise ConfigError(f"unknown dedup keep policy {keep!r}; choose one of {', '.join(KEEP_POLICIES)}")


def check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ConfigError(f"unknown dedup rule {rule!r}; choose one of {', '.join(RULES)}")


def _keys(rows: np.ndarray, keep: str, scores: np.ndarray | None, ids: np.ndarray, seed: int) -> tuple:
    """``np.lexsort`` keys (last = primary) ordering ``rows`` by keeper preference."""
    tie = ids[rows]
    if keep == "first":
        return (tie,)
    if keep == "random":
        return (tie, mix64(ids[rows], seed))
    if scores is None:
        raise ValueError(f"keep={keep!r} needs scores")
    s = np.asarray(scores, dtype=np.float64)[rows]
    s = s if keep == "easy" else -s
    return (tie, np.where(np.isnan(s), np.inf, s))  # NaN scores are kept last


def _ids(n: int, sample_ids: np.ndarray | None) -> np.ndarray:
    ids = np.arange(n, dtype=np.uint64) if sample_ids is None else np.asarray(sample_ids, dtype=np.uint64)
    if ids.shape != (n,):
        raise ValueError(f"{ids.shape[0]} sample ids for {n} rows")
    return ids


def keeper_order(rows: np.ndarray, keep: str, *, scores=None, sample_ids=None, seed: int = 0, n: int) -> np.ndarray:
    """``rows`` sorted by keeper preference (the first would be kept first)."""
    check_keep(keep)
    rows = np.asarray(rows, dtype=np.int64)
    return rows[np.lexsort(_keys(rows, keep, scores, _ids(n, sample_ids), seed))] if rows.size else rows


def choose_keepers(
    dup_group: np.ndarray,
    keep: str = "first",
    *,
    scores: np.ndarray | None = None,
    sample_ids: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """``is_duplicate`` (bool): True for every group member except one keeper per group.

    See the module docstring for the policies. ``scores`` (higher = harder) is required for
    ``"easy"``/``"hard"``; NaN scores lose (they are kept last). Ties → lower ``sample_id``
    (lower row when ``sample_ids`` is None).
    """
    check_keep(keep)
    g = np.asarray(dup_group, dtype=np.int64)
    n = g.shape[0]
    rows = np.flatnonzero(g >= 0)
    is_dup = np.zeros(n, dtype=bool)
    ids = _ids(n, sample_ids)
    if rows.size == 0:
        return is_dup
    o = rows[np.lexsort(_keys(rows, keep, scores, ids, seed) + (g[rows],))]  # by group, then key, then tie
    first = np.r_[True, g[o][1:] != g[o][:-1]]
    is_dup[o] = True
    is_dup[o[first]] = False
    return is_dup


def ordered_pass(x: Any, mem: np.ndarray, thr: float, rule: str, block: int, device: Any, st: dict):
    """One cluster, ``mem`` = its rows in keeper order, for ``rule`` ``"greedy"`` or ``"semdedup"``.

    Returns ``(removed, attach, max_sim)`` over positions in ``mem``: ``removed`` bool; ``attach``
    int64, the position of the earlier row a removed row is attached to (-1 for kept rows);
    ``max_sim`` float32, the max cosine to any other row of the cluster (-inf for a lone row).
    """
    import torch

    nc, b, neg = int(mem.shape[0]), int(block), float("-inf")
    ms = torch.full((nc,), neg, dtype=torch.float32, device=device)
    kept = np.zeros(nc, dtype=bool)
    attach = np.full(nc, -1, dtype=np.int64)
    for j0 in range(0, nc, b):
        xj = load_rows(x, mem[j0 : j0 + b], device)
        j1 = j0 + xj.shape[0]
        nj = j1 - j0
        best = torch.full((nj,), neg, dtype=torch.float32, device=device)  # max sim to an eligible earlier row
        arg = torch.full((nj,), -1, dtype=torch.int64, device=device)
        for i0 in range(0, j0, b):  # earlier blocks
            xi = load_rows(x, mem[i0 : i0 + b], device)
            i1 = i0 + xi.shape[0]
            s = xi @ xj.T
            st["tiles"] += 1
            st["max_tile_elems"] = max(st["max_tile_elems"], s.numel())
            ms[i0:i1] = torch.maximum(ms[i0:i1], s.amax(dim=1))
            ms[j0:j1] = torch.maximum(ms[j0:j1], s.amax(dim=0))
            elig = np.arange(i0, i1) if rule == "semdedup" else np.flatnonzero(kept[i0:i1]) + i0
            if elig.size == 0:
                continue
            if elig.size < i1 - i0:
                s = s[torch.from_numpy(elig - i0).to(s.device)]
            cmax, carg = s.max(dim=0)
            better = cmax > best  # strict: on ties the earlier row wins
            best = torch.where(better, cmax, best)
            arg = torch.where(better, torch.from_numpy(elig).to(s.device)[carg], arg)
            del s
        s = xj @ xj.T  # the diagonal tile
        st["tiles"] += 1
        st["max_tile_elems"] = max(st["max_tile_elems"], s.numel())
        s.fill_diagonal_(neg)
        ms[j0:j1] = torch.maximum(ms[j0:j1], s.amax(dim=1))
        best_n, arg_n = best.cpu().numpy(), arg.cpu().numpy()
        if rule == "semdedup":  # only earlier rows (q < p) of this tile count
            s.masked_fill_(torch.ones(nj, nj, dtype=torch.bool, device=s.device).tril_(), neg)
            cmax, carg = (t.cpu().numpy() for t in s.max(dim=0))
            removed = np.maximum(best_n, cmax) > thr
        else:
            sn = s.cpu().numpy()
            und = best_n < thr  # not yet removed by a row kept in an earlier block
            keep_blk = np.zeros(nj, dtype=bool)
            for p in np.flatnonzero(und).tolist():
                if und[p]:
                    keep_blk[p] = True
                    und[p + 1 :] &= sn[p, p + 1 :] < thr
            removed = ~keep_blk
            kp = np.flatnonzero(keep_blk)
            if kp.size:
                q = sn[kp]  # kept rows of this tile x the tile, earlier kept rows only
                q[kp[:, None] >= np.arange(nj)[None, :]] = neg
                cmax, carg = q.max(axis=0), kp[q.argmax(axis=0)]
                del q
            else:
                cmax, carg = np.full(nj, neg, dtype=np.float32), np.zeros(nj, dtype=np.int64)
        better = cmax > best_n  # strict: rows of earlier blocks come first in keeper order
        att = np.where(better, carg + j0, arg_n)
        attach[j0:j1] = np.where(removed, att, -1)
        kept[j0:j1] = ~removed
        st["pairs"] += int(removed.sum())
        del s
    return ~kept, attach, ms.cpu().numpy()


def attached_roots(removed: np.ndarray, attach: np.ndarray) -> np.ndarray:
    """Position of the kept row each row's chain of attachments ends at (itself when kept)."""
    r = np.where(removed, attach, np.arange(removed.shape[0]))
    while True:
        rr = r[r]
        if np.array_equal(rr, r):
            return r
        r = rr
