"""``text-dedup``: exact copies and MinHash-LSH near copies of text documents (Lee et al. 2022, NearDup).

Per shard, in the data workers: each document's normalised text (:func:`.minhash.normalise`) is hashed
whole (xxh3-128: exact copies), and its word ``--ngram`` shingles give a ``--num-perm`` MinHash
signature, cut into ``b`` bands of ``r`` rows (:func:`.minhash.optimal_bands` from ``--threshold``) with
one 64-bit key per band. Signatures and band keys are saved per shard, band-major.

Then, one band at a time (memory: one band's ``N`` keys and their sort, not the corpus's signatures;
the signatures are read from a memory map only for candidate pairs): documents with equal keys are
candidates. Inside a bucket (its rows in corpus order) each row is paired with the bucket's first row
and with the row before it — at most two pairs per row per band, so a bucket of ``k`` copies costs
``2k`` comparisons, not ``k²``, and still connects every member — and a pair is kept only when the
signatures' estimated Jaccard (the share of equal values) is ≥ ``--threshold``: LSH false positives do
not survive. The exact hashes are one more "band" whose equal pairs need no check. Under torchrun
the bands are shared out between ranks (band ``j`` on rank ``j mod world``); rank 0 joins them.

Groups are the connected components of the kept pairs (union-find, :mod:`.dedup`'s vectorised one),
one keeper per component (:func:`.keepers.choose_keepers`; ``--dedup-keep``: ``first`` in corpus order,
the default; ``longest`` in bytes; ``random``, seeded by sample id). Columns as the image ``dedup``
writes them: ``dup_group`` (-1: no copy), ``is_duplicate`` (all but the keeper), ``dup_max_sim`` (the
highest estimated Jaccard of the row's candidate pairs, checked or not; 1 for exact copies; NaN for a
row that never shared a bucket), so ``select --dedup`` works unchanged.
"""

from __future__ import annotations

import os

import numpy as np

from .base import Metric, TextPass, register
from .dedup import _group_ids, _roots, _union
from .keepers import choose_keepers
from .minhash import band_keys, normalise, optimal_bands, permutations, shingle_hashes, signatures

PAIR_BLOCK = 1 << 16  # candidate pairs compared at a time (two blocks of signature rows in memory)
_PERMS: dict = {}


def _perms(num_perm: int):
    if num_perm not in _PERMS:
        _PERMS[num_perm] = permutations(num_perm)
    return _PERMS[num_perm]


def bucket_pairs(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs ``(first, second)`` of equal ``keys``: each row with its bucket's first row and
    with the row before it (rows in ascending order inside a bucket)."""
    o = np.lexsort((rows, keys))
    sk, sr = keys[o], rows[o]
    same = np.r_[False, sk[1:] == sk[:-1]]  # same[i]: row i continues the bucket of row i-1
    if not same.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    head = np.maximum.accumulate(np.where(~same, np.arange(sk.size), 0))  # position of each bucket's first row
    i = np.flatnonzero(same)
    prev = np.stack([sr[i - 1], sr[i]])
    far = i[head[i] != i - 1]
    heads = np.stack([sr[head[far]], sr[far]])
    pairs = np.concatenate([prev, heads], axis=1)
    return pairs[0].astype(np.int64), pairs[1].astype(np.int64)


def estimated_jaccard(sig, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal signature values of each pair (rows of ``sig``, a memory map is fine)."""
    out = np.empty(a.size, np.float32)
    for i in range(0, a.size, PAIR_BLOCK):
        x, y = np.asarray(sig[a[i: i + PAIR_BLOCK]]), np.asarray(sig[b[i: i + PAIR_BLOCK]])
        out[i: i + PAIR_BLOCK] = (x == y).mean(axis=1)
    return out


class TextDedup(TextPass):
    def shard(self, docs: list[str], cfg) -> dict[str, np.ndarray]:
        import xxhash

        a, b = _perms(cfg.num_perm)
        norm = [normalise(d).encode("utf-8") for d in docs]
        exact = np.zeros((len(docs), 2), np.uint64)
        for i, t in enumerate(norm):
            h = xxhash.xxh3_128_intdigest(t)
            exact[i] = (h >> 64, h & 0xFFFFFFFFFFFFFFFF)
        sig = signatures([shingle_hashes(t, cfg.ngram) for t in norm], a, b)
        bands, rows = optimal_bands(cfg.threshold, cfg.num_perm)
        return {"sig": sig, "bands": band_keys(sig, bands, rows), "exact": exact,
                "nbytes": np.fromiter((len(d.encode("utf-8")) for d in docs), np.int64, count=len(docs)),
                "empty": np.fromiter((not t for t in norm), bool, count=len(docs))}

    def combine(self, ts) -> dict[str, np.ndarray] | None:
        cfg, n = ts.cfg, ts.n
        bands, rows = optimal_bands(cfg.threshold, cfg.num_perm)
        ts.info.update(text_dedup={"bands": bands, "rows": rows, "num_perm": cfg.num_perm, "ngram": cfg.ngram,
                                   "threshold": cfg.threshold, "keep": cfg.dedup_keep})
        ts.emit("text_bands", {"bands": bands, "rows": rows})
        names = ("sig", "exact", "empty")
        if ts.rank == 0:  # one rank joins the shards' arrays; the others open what it wrote
            for name in names:
                ts.array("text-dedup", name)
        ts.barrier()
        sig, exact, empty = (ts.array("text-dedup", name) for name in names)
        live = np.flatnonzero(~np.asarray(empty, bool))
        for j in range(ts.rank, bands + 1, ts.world):  # j == bands: the exact hashes
            if j < bands:
                a, b = bucket_pairs(np.asarray(ts.band("text-dedup", "bands", j))[live], live)
                sim = estimated_jaccard(sig, a, b)
            else:
                a, b = bucket_pairs(np.asarray(exact[:, 1]), np.arange(n))
                a, b = (v[exact[a, 0] == exact[b, 0]] for v in (a, b))
                sim = np.ones(a.size, np.float32)
            np.savez(ts.path(f"text-dedup-pairs-{j:05d}.npz"), a=a, b=b, sim=sim)
        ts.barrier()
        if ts.rank != 0:
            return None
        parent = np.arange(n, dtype=np.int64)
        max_sim = np.full(n, np.nan, np.float32)
        checked = kept = 0
        for j in range(bands + 1):
            f = ts.path(f"text-dedup-pairs-{j:05d}.npz")
            with np.load(f) as z:
                a, b, sim = z["a"], z["b"], z["sim"]
            os.unlink(f)
            checked += a.size
            np.fmax.at(max_sim, a, sim)
            np.fmax.at(max_sim, b, sim)
            ok = sim >= cfg.threshold - 1e-6
            kept += int(ok.sum())
            _union(parent, a[ok], b[ok])
        groups = _group_ids(_roots(parent))
        keep = cfg.dedup_keep
        if keep == "longest":
            is_dup = choose_keepers(groups, "hard", scores=np.asarray(ts.array("text-dedup", "nbytes"), np.float64))
        elif keep == "random":
            is_dup = choose_keepers(groups, "random", sample_ids=ts.ids, seed=cfg.seed)
        else:
            is_dup = choose_keepers(groups, "first")  # sample_ids None: the lowest row, i.e. corpus order
        ts.info["text_dedup"].update(candidate_pairs=int(checked), similar_pairs=int(kept), groups=int(groups.max(initial=-1) + 1),
                                     duplicates=int(is_dup.sum()))
        return {"dup_group": groups, "dup_max_sim": max_sim, "is_duplicate": is_dup}


def _params(cfg) -> dict:
    bands, rows = optimal_bands(cfg.threshold, cfg.num_perm)
    return {"ngram": cfg.ngram, "num_perm": cfg.num_perm, "threshold": cfg.threshold, "bands": bands, "rows": rows,
            "keep": cfg.dedup_keep, "seed": cfg.seed, "normalisation": "NFC, casefold, whitespace collapsed"}


register(Metric(
    "text-dedup", "text", False, False, 0.0, 1.0,
    "exact copies (after NFC, casefold, whitespace collapsed) and MinHash-LSH near copies (estimated Jaccard of word "
    "n-gram shingles ≥ threshold) of text documents; flags, not a difficulty score",
    columns=(), extra_columns=("dup_group", "dup_max_sim", "is_duplicate"), compute=TextDedup(),
    direction="is_duplicate = True marks redundant rows", params=_params,
))
