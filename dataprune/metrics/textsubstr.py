"""``text-substr``: the share of each document's bytes inside repeated spans (Lee et al. 2022, ExactSubstr).

Tokens are the document's whitespace-separated words (``bytes.split()`` of its UTF-8: ASCII
whitespace), compared exactly (no normalisation). A span of ≥ ``--min-span`` tokens is *repeated*
when the same token sequence occurs at another position of the corpus — in another document or
elsewhere in the same one (both count, as in Lee et al.). ``dup_span_frac`` is the share of the
document's bytes covered by such spans (from a span's first token's first byte to its last token's
last byte, the whitespace inside included): 0 = nothing repeated, 1 = every byte repeated elsewhere.
Higher = more redundant, so ``select --max-score`` drops heavily repeated documents.

Per shard (data workers): each token's xxh3-64 hash and byte range. Then once, globally: tokens get
dense ids (``np.unique``), every document is followed by a separator id of its own (no match
crosses a document boundary), and pydivsufsort builds the suffix array and the LCP array (Kasai)
of that one integer sequence. Suffixes next to each other in the suffix array with an LCP ≥
``min_span`` both start a repeated span of that length; the union of the spans is a difference
array's prefix sum. All of it is vectorised.

Memory (the suffix array is global): the int32 sequence, suffix array and LCP, the uint64 hashes,
their sort and inverse, the int64 spans: measured 58 bytes a token at the peak above the rest of the
run (``benchmarks/bench_textdedup.py``, 2.3 M tokens), i.e. ~6 GiB for 100 M tokens (~0.5 GB of
English text); beyond 2³¹ − 1 tokens + documents the arrays are int64 and the need grows by half. Under torchrun rank 0
builds it alone (the suffix array cannot be split by shard).
"""

from __future__ import annotations

import numpy as np

from .base import Metric, TextPass, register
from .minhash import word_hashes

_WS = np.zeros(256, bool)
_WS[[9, 10, 11, 12, 13, 32]] = True  # bytes.split()'s whitespace


def token_spans(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end byte of every whitespace token of ``data`` (int64)."""
    if not data:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ws = _WS[np.frombuffer(data, np.uint8)]
    edge = np.diff(np.r_[True, ws, True].astype(np.int8))
    return np.flatnonzero(edge == -1), np.flatnonzero(edge == 1)


def covered_tokens(seq: np.ndarray, min_span: int) -> np.ndarray:
    """bool per position of ``seq``: inside a span of ≥ ``min_span`` values that occurs elsewhere in it."""
    from pydivsufsort import divsufsort, kasai

    n = seq.size
    if n < 2:
        return np.zeros(n, bool)
    sa = divsufsort(seq)
    lcp = kasai(seq, sa)  # lcp[k] = longest common prefix of suffixes sa[k] and sa[k + 1]
    lcp = np.asarray(lcp, np.int64)
    longest = np.maximum(np.r_[0, lcp[:-1]], lcp)  # of suffix sa[k] with either neighbour
    del lcp
    hit = longest >= min_span
    start, length = np.asarray(sa, np.int64)[hit], longest[hit]
    del sa, longest, hit
    diff = np.bincount(start, minlength=n + 1)[: n + 1].astype(np.int64)
    diff -= np.bincount(start + length, minlength=n + 1)[: n + 1]
    return np.cumsum(diff[:n]) > 0


class TextSubstr(TextPass):
    def shard(self, docs: list[str], cfg) -> dict[str, np.ndarray]:
        toks, starts, ends, ntok, nbytes = [], [], [], [], []
        for d in docs:
            data = d.encode("utf-8")
            s, e = token_spans(data)
            toks.append(word_hashes(data.split()))
            starts.append(s)
            ends.append(e)
            ntok.append(s.size)
            nbytes.append(len(data))
        cat = (lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t))
        return {"tok": cat(toks, np.uint64), "start": cat(starts, np.int64), "end": cat(ends, np.int64),
                "ntok": np.asarray(ntok, np.int64), "nbytes": np.asarray(nbytes, np.int64)}

    def combine(self, ts) -> dict[str, np.ndarray] | None:
        if ts.rank != 0:
            return None
        ntok = np.asarray(ts.array("text-substr", "ntok"))
        nbytes = np.asarray(ts.array("text-substr", "nbytes"))
        d, t = ntok.size, int(ntok.sum())
        frac = np.zeros(d, np.float32)
        if t:
            uniq, inv = np.unique(np.asarray(ts.array("text-substr", "tok")), return_inverse=True)
            v = uniq.size
            del uniq
            dtype = np.int32 if t + d + v < (1 << 31) - 1 else np.int64
            doc = np.repeat(np.arange(d), ntok)
            pos = np.arange(t) + doc  # each document's tokens, then its separator
            seq = np.empty(t + d, dtype)
            seq[pos] = inv
            del inv
            seps = np.cumsum(ntok) + np.arange(d)
            seq[seps] = v + np.arange(d)
            cov = covered_tokens(seq, ts.cfg.min_span)[pos]
            del seq
            start, end = np.asarray(ts.array("text-substr", "start")), np.asarray(ts.array("text-substr", "end"))
            nxt = np.r_[cov[1:], False] & np.r_[doc[1:] == doc[:-1], False]  # the next token is covered too
            gap = np.r_[start[1:] - end[:-1], 0]
            bytes_ = np.where(cov, end - start + np.where(nxt, gap, 0), 0)
            got = np.bincount(doc, weights=bytes_, minlength=d)
            frac = np.where(nbytes > 0, got / np.maximum(nbytes, 1), 0.0).astype(np.float32)
        ts.info["text_substr"] = {"tokens": t, "documents": d, "min_span": ts.cfg.min_span,
                                  "repeated_bytes_share": round(float((frac * nbytes).sum() / max(1, nbytes.sum())), 6)}
        return {"dup_span_frac": np.clip(frac, 0.0, 1.0)}


register(Metric(
    "text-substr", "text", False, False, 0.0, 1.0,
    "share of the document's bytes in spans of ≥ min-span whitespace tokens that occur elsewhere in the corpus "
    "(suffix array); higher = more repeated",
    columns=("dup_span_frac",), compute=TextSubstr(), params=lambda cfg: {"min_span": cfg.min_span, "tokens": "whitespace"},
))
