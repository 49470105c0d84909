"""A bounded, derandomised fuzz pass over the untrusted-input readers (benchmarks/fuzz_data_plane.py
has the targets and a longer run): tar reader (fast and strict paths must agree), parquet source,
manifest reader + export. Anything but a DataPruneError escaping fails."""

from __future__ import annotations

from pathlib import Path

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_data_plane.py"


def test_fuzz_readers_raise_only_dataprune_errors(mk):
    with mk.module(HARNESS) as fuzz:
        counts = fuzz.run(examples=150)
    assert all(counts.get(k, 0) >= 100 for k in ("tar", "parquet", "manifest")), counts
    assert counts.get("manifest exported", 0) > 0 and counts.get("manifest exported", 0) < counts["manifest"]  # both outcomes met
