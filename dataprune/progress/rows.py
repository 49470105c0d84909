"""How many samples each shard holds, as far as a plan can tell without reading the data.

* Image-folder shards list their files: exact (the files, plus the problems found while listing,
  which are counted like samples).
* Otherwise up to ``probe`` local shards are counted cheaply — a tar's headers are read with seeks,
  never its data (one key per sample, as WebDataset groups members); a parquet file's footer
  gives its rows — and every other shard is estimated from its byte size at the probed rows per
  byte.
* None where nothing is known (URLs, compressed tars alone): the reporter refines from the shards
  it sees (``Rows.observe``).
"""

from __future__ import annotations

import os
import tarfile
import time
from typing import Optional


def _tar_keys(path: str, deadline: float) -> Optional[int]:
    keys, n = set(), 0
    with tarfile.open(path, "r:") as tf:  # uncompressed: next() seeks over each member's data
        for m in tf:
            if m.isfile():
                d, _, base = m.name.rpartition("/")
                keys.add((d, base.split(".", 1)[0]))
            n += 1
            if n % 1024 == 0 and time.monotonic() > deadline:
                return None
    return len(keys)


def count_rows(path: str, deadline: float) -> Optional[int]:
    """Rows of one local shard file, or None when that is not cheap to tell."""
    try:
        if path.endswith(".tar"):
            return _tar_keys(path, deadline)
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, ValueError, tarfile.TarError, ImportError):
        return None
    return None


def estimate_rows(shards, probe: int = 3, budget_s: float = 1.0) -> dict:
    """``{"rows": {index: rows or None}, "bytes": {index: bytes or None}, "exact": [indices]}``."""
    rows: dict[int, Optional[float]] = {}
    nbytes = {s.index: s.size for s in shards}
    exact: list[int] = []
    counted = []
    deadline = time.monotonic() + budget_s
    for s in shards:
        if s.files or s.problems:
            rows[s.index] = float(len(s.files) + len(s.problems))
            exact.append(s.index)
        elif len(counted) < probe and s.size and os.path.isfile(s.path) and time.monotonic() < deadline:
            n = count_rows(s.path, deadline)
            rows[s.index] = None if n is None else float(n)
            if n is not None:
                exact.append(s.index)
                counted.append((n, s.size))
        else:
            rows[s.index] = None
    per_byte = sum(n for n, _ in counted) / sum(b for _, b in counted) if counted else None
    if per_byte is not None:
        for s in shards:
            if rows[s.index] is None and s.size:
                rows[s.index] = s.size * per_byte
    return {"rows": rows, "bytes": nbytes, "exact": exact}


class Rows:
    """Per-shard row estimates, refined as shards are seen: a seen shard's rows are exact, and
    shards known only by their byte size are re-estimated at the rows per byte seen so far."""

    def __init__(self, est: Optional[dict] = None):
        est = est or {}
        self.rows: dict[int, Optional[float]] = dict(est.get("rows") or {})
        self.bytes: dict[int, Optional[int]] = dict(est.get("bytes") or {})
        self.exact = set(est.get("exact") or ())

    def of(self, indices) -> Optional[float]:
        """Total rows of these shards; None when one of them is unknown."""
        tot = 0.0
        for i in indices:
            r = self.rows.get(i)
            if r is None:
                return None
            tot += r
        return tot

    def observe(self, index: int, rows: float) -> None:
        self.rows[index] = float(rows)
        self.exact.add(index)
        seen = [(self.rows[i], self.bytes.get(i)) for i in self.exact if self.bytes.get(i)]
        if not seen:
            return
        per_byte = sum(r for r, _ in seen) / sum(b for _, b in seen)
        for i, b in self.bytes.items():
            if i not in self.exact and b:
                self.rows[i] = b * per_byte
