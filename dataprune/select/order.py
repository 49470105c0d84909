"""The order of rows and the arithmetic of budgets: pure functions over numpy columns.

Every metric column means *higher = harder*. Rows are ordered by ``(score, mix64(sample_id, seed))``
(``order_key`` then the hash inside ``top_k_per_group``), so a choice depends only on
``(sample_id, score, seed)`` — never on row order, file order or the number of processes. Budgets
and per-class quotas are exact integer arithmetic (``budget``, ``largest_remainder``, ``class_quotas``).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..ids import mix64
from ..ranks import average_ranks


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
        out += average_ranks(col) / max(n - 1, 1)
    return out / len(columns)
