"""Review of the embed global step's memory budget (264d4e6): edge cases of the computed job rows
(`metrics/rows.JobRows`) and of the spill directory `OUT/.embed-spill` after a user error."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.errors import ConfigError
from dataprune.metrics.rows import JobRows

# a rank's segments (an empty shard in the middle) and the job rows of their first rows
SEGMENTS, FIRSTS = [(0, 5), (5, 5), (5, 10)], [100, 150, 200]


def _stored() -> np.ndarray:
    """The array JobRows replaces (what `sharded.job_metrics` concatenated before 264d4e6)."""
    return np.concatenate([np.arange(f, f + (b - a), dtype=np.int64) for (a, b), f in zip(SEGMENTS, FIRSTS)])


def test_job_rows_negative_indices_count_from_the_end():
    rows, ref = JobRows(SEGMENTS, FIRSTS), _stored()
    idx = np.array([-1, -2, 3, -10])
    np.testing.assert_array_equal(rows[idx], ref[idx])


def test_job_rows_boolean_mask_selects_rows():
    rows, ref = JobRows(SEGMENTS, FIRSTS), _stored()
    mask = np.zeros(10, bool)
    mask[[2, 7]] = True
    np.testing.assert_array_equal(rows[mask], ref[mask])


def test_job_rows_out_of_range_is_an_index_error():
    rows = JobRows(SEGMENTS, FIRSTS)
    with pytest.raises(IndexError):
        rows[np.array([10])]
    with pytest.raises(IndexError):
        rows[np.array([-11])]


def test_job_rows_slices_match_the_stored_rows():
    """What holds: slices of any step, and an empty rank."""
    rows, ref = JobRows(SEGMENTS, FIRSTS), _stored()
    for s in (slice(2, 8), slice(None, None, -1), slice(-3, None), slice(4, 2), slice(0, 100)):
        np.testing.assert_array_equal(rows[s], ref[s])
    assert JobRows([], [])[0:0].shape == (0,)


def _cache(d, sizes, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(d)
    for i, k in enumerate(sizes):
        x = rng.standard_normal((k, dim))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        np.save(os.path.join(d, f"emb-{i:06d}.npy"), x)
        h = rng.integers(1, 2**63, size=k, dtype=np.uint64)
        pq.write_table(pa.table({"emb_row": pa.array(np.arange(k, dtype=np.int32)), "label": pa.array(rng.integers(-1, 3, k)),
                                 "sample_id": pa.array(rng.integers(0, 2**63, size=k, dtype=np.uint64)),
                                 "bytes_hash": pa.array(h), "pixel_hash": pa.array(h)}),
                       os.path.join(d, f"base-{i:06d}.parquet"))


def test_a_config_error_in_one_process_leaves_no_spill_in_out(tmp_path):
    """--clusters above the embedded rows is a user error (a clear ConfigError); since 264d4e6 the
    base columns are spilled to OUT/.embed-spill before k-means, and that error leaves them there
    (sample ids and hashes, 24 bytes a row), though nothing of the run is resumable from them."""
    from dataprune.engine.sharded import job_metrics
    from dataprune.metrics import get_metric

    _cache(str(tmp_path / "cache"), [3, 2])
    out = tmp_path / "out"
    out.mkdir()
    cfg = SimpleNamespace(out=str(out), clusters=8, kmeans_iters=4, kmeans_sample=None, kmeans_backend="torch", seed=3,
                          dedup_eps=0.02, dedup_keep="hard", dedup_rule="greedy")
    p = SimpleNamespace(cfg=cfg, shards=[SimpleNamespace(index=i) for i in range(2)], num_classes=3,
                        metrics=[get_metric(m) for m in ("prototypes", "dedup")])
    with pytest.raises(ConfigError, match="--clusters 8 is more than the 5 rows"):
        job_metrics(p, str(tmp_path / "cache"), "cpu", lambda *a: None, 0, 1)
    assert os.listdir(out) == []
