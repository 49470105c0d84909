"""Stable sample identity.

A sample is identified by ``(scope, key)``: for tar and parquet sources the scope is the shard name
(keys are only unique inside a shard), for image folders it is empty (the relative path is unique in
the whole dataset, so ids survive re-cutting the folder into virtual shards). The pair is hashed with
BLAKE2b into an unsigned 64-bit ``sample_id`` that every table joins on.
"""

from __future__ import annotations

import hashlib

import numpy as np

_MASK = (1 << 64) - 1


def sample_id(scope: str, key: str) -> int:
    """uint64 id of ``key`` inside ``scope`` (stable across runs, machines and Python versions).
    Never raises on a name with undecodable bytes (lone surrogates are hashed as they are encoded
    by ``surrogatepass``; valid UTF-8 is unaffected) — sources count such names as problems."""
    h = hashlib.blake2b(digest_size=8, person=b"dataprune-id")
    h.update(scope.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(key.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little")


def mix64(ids: np.ndarray, seed: int) -> np.ndarray:
    """Vectorised splitmix64 of ``ids`` xor a seed-derived constant: a uint64 per id.

    Used for every seeded random choice (random selection, tie breaking, shuffling) so that results
    depend only on ``(sample_id, seed)``, never on row order, file order or process count.
    """
    x = np.asarray(ids, dtype=np.uint64)
    s = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK)
    with np.errstate(over="ignore"):
        z = x ^ s
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def unit_random(ids: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic uniform floats in [0, 1) per id (53 bits of ``mix64``)."""
    return (mix64(ids, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
