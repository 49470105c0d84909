"""The global embed metrics across torchrun ranks (k-means, assignment, partitioned dedup) equal one
process's: two gloo CPU ranks on a cache written here, uneven shards, a rank that dies mid-step, and
a real `dataprune score` job stopped by SIGTERM and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dataprune.metrics.dedup_dist import owners_by_size
from dataprune.metrics.kmeans_dist import Comm, FIXED, fit, sample_threshold
from dataprune.metrics.rows import ConcatRows, JobRows, NpyColumn, NpyRows, PickedRows

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--monitor-interval", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
SIZES = (500, 300, 200)  # 3 shards over 2 ranks: rank 0 holds shards 0 and 2 (700 rows), rank 1 shard 1 (300)
RULES = ("greedy", "semdedup", "components")

JOB = """
import json, os, sys
from types import SimpleNamespace
import numpy as np
from dataprune.distributed import dist_info, rank_shards
from dataprune.engine.sharded import job_metrics
from dataprune.errors import DataPruneError
from dataprune.metrics import get_metric
from dataprune.metrics.kmeans_dist import Comm, fit
from dataprune.metrics.rows import ConcatRows, NpyRows

cache, out, die = sys.argv[1], sys.argv[2], sys.argv[3]
rank, world = dist_info()
if "tiny" in die:  # budgets so small that every step runs in many chunks and batches
    import dataprune.metrics.dedup_dist as dd, dataprune.metrics.kmeans_dist as kd
    dd.BATCH_ROWS, dd.CHUNK, kd.HASH_CHUNK = 400, 37, 29
if "dedup" in die and rank == 1:  # this rank dies after deduplicating its first batch
    import dataprune.metrics.dedup_dist as dd
    real, calls = dd.dedup_owned, []
    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os._exit(3)
        return real(*a, **k)
    dd.dedup_owned = dying
if world > 1:
    import torch.distributed as dist
    dist.init_process_group("gloo")
shards = [SimpleNamespace(index=i) for i in range(int(open(os.path.join(cache, "n")).read()))]

def emit(kind, info):
    if die == "kmeans" and rank == 1 and kind == "kmeans_step" and info["done"] == 2:
        os._exit(3)  # this rank dies in the middle of the Lloyd iterations

res = {}
try:
    for rule in %(rules)r:
        cfg = SimpleNamespace(out=out, clusters=6, kmeans_iters=8, kmeans_sample=700, kmeans_backend="torch", seed=3,
                              dedup_eps=0.02, dedup_keep="hard", dedup_rule=rule)
        p = SimpleNamespace(cfg=cfg, shards=shards, num_classes=5,
                            metrics=[get_metric(m) for m in ("prototypes", "class-prototypes", "dedup")])
        offsets, cols, info = job_metrics(p, cache, "cpu", emit, rank, world)
        res.update({rule + "/" + k: v for k, v in cols.items()})
        res[rule + "/batches"] = info["dedup_batches"]
    mine = rank_shards(shards, rank, world)
    parts = [NpyRows(os.path.join(cache, "emb-%%06d.npy" %% s.index)) for s in mine]
    at, segs = 0, []
    for pt in parts:
        segs.append((at, at + pt.shape[0]))
        at += pt.shape[0]
    ids = np.concatenate([np.load(os.path.join(cache, "ids-%%06d.npy" %% s.index)) for s in mine])
    comm = Comm.from_job(rank, world)
    res["centroids"], res["fitted"] = fit(ConcatRows(parts), segs, ids, 6, comm, iters=8, seed=3, sample=700)
    # 4 distinct points (picked by id, so the same rows whatever the split) and 6 clusters: clusters go
    # empty and are refilled with the job's farthest rows
    four = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)[(ids %% 4).astype(np.int64)]
    res["refilled"], _ = fit(four, segs, ids, 6, comm, iters=4, seed=3, sample=700, init="random")
except DataPruneError as e:
    print("error: " + str(e), file=sys.stderr)
    sys.exit(e.exit_code)
res["offsets"] = json.dumps(offsets)
np.savez(os.path.join(out, "rank%%d.npz" %% rank), **res)
if world > 1:
    dist.destroy_process_group()  # gloo's threads joined before exit (else a C++ terminate at exit)
""" % {"rules": RULES}


def _cache(d, seed=0):
    """A cache in the engine's layout: per shard float16 ``emb-N.npy`` and ``base-N.parquet``;
    6 clusters, planted near copies (cos ≈ 0.999) and exact copies (same row, same hashes)."""
    rng = np.random.default_rng(seed)
    n, dim = sum(SIZES), 32
    centres = rng.standard_normal((6, dim))
    x = centres[rng.integers(6, size=n)] + 0.35 * rng.standard_normal((n, dim))
    bh, ph = rng.integers(1, 2**63, size=n, dtype=np.uint64), rng.integers(1, 2**63, size=n, dtype=np.uint64)
    src, dst = rng.choice(n, size=(2, 60), replace=False)
    x[dst[:40]] = x[src[:40]] + 0.01 * rng.standard_normal((40, dim))  # near copies, across shards too
    x[dst[40:]] = x[src[40:]]  # exact copies: same pixels
    bh[dst[40:]], ph[dst[40:]] = bh[src[40:]], ph[src[40:]]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    labels = rng.integers(-1, 5, size=n)
    ids = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64)
    os.makedirs(d)
    at = 0
    for i, k in enumerate(SIZES):
        sl = slice(at, at + k)
        np.save(os.path.join(d, f"emb-{i:06d}.npy"), x[sl])
        np.save(os.path.join(d, f"ids-{i:06d}.npy"), ids[sl])
        pq.write_table(pa.table({"emb_row": pa.array(np.arange(k, dtype=np.int32)), "label": pa.array(labels[sl]),
                                 "sample_id": pa.array(ids[sl]), "bytes_hash": pa.array(bh[sl]), "pixel_hash": pa.array(ph[sl])}),
                       os.path.join(d, f"base-{i:06d}.parquet"))
        at += k
    with open(os.path.join(d, "n"), "w") as f:
        f.write(str(len(SIZES)))
    return x, dst


def _port() -> str:
    """A free TCP port for torchrun's rendezvous (other jobs on the machine may hold fixed ones)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(tmp_path, name, world, die="", timeout=120, env=ENV):
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    script = tmp_path / "job.py"
    script.write_text(JOB)
    cmd = ([*TORCHRUN, "--master-port", _port()] if world > 1 else [sys.executable]) + [str(script)]
    t0 = time.perf_counter()
    p = subprocess.run([*cmd, str(tmp_path / "cache"), str(out), die], capture_output=True, text=True, timeout=timeout, env=env)
    return p, out, time.perf_counter() - t0


def _columns(out, world):
    """Every rank's columns put back in the job's row order (shards in order)."""
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in range(world)]
    first = np.concatenate([[0], np.cumsum(SIZES)])
    cols = {}
    for k in ranks[0]:
        if "/" not in k or k.endswith("/batches"):
            continue
        full = np.empty(first[-1], ranks[0][k].dtype)
        for r, z in enumerate(ranks):
            for s, off in json.loads(str(z["offsets"])).items():
                s = int(s)
                full[first[s] : first[s + 1]] = z[k][off : off + SIZES[s]]
        cols[k] = full
    return cols, ranks


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    x, planted = _cache(tmp / "cache")
    one, out1, _ = _run(tmp, "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, out2, _ = _run(tmp, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    return x, planted, _columns(out1, 1), _columns(out2, 2), tmp


def test_two_ranks_give_one_process_columns_on_uneven_shards(jobs):
    x, planted, (a, ra), (b, rb), tmp = jobs
    np.testing.assert_allclose(rb[0]["centroids"], ra[0]["centroids"], atol=1e-6)  # the documented tolerance
    np.testing.assert_array_equal(rb[0]["centroids"], rb[1]["centroids"])  # every rank holds the same centroids
    np.testing.assert_allclose(rb[0]["refilled"], ra[0]["refilled"], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ra[0]["refilled"], axis=1), 1.0, atol=1e-5)
    assert int(ra[0]["fitted"]) == 700 == int(rb[0]["fitted"])  # the hash-chosen sample: exactly --kmeans-sample rows
    for rule in RULES:
        for c in ("cluster", "dup_group", "is_duplicate"):
            np.testing.assert_array_equal(a[f"{rule}/{c}"], b[f"{rule}/{c}"], err_msg=f"{rule}/{c}")
        for c in ("prototypes", "class_prototypes", "dup_max_sim"):
            np.testing.assert_allclose(a[f"{rule}/{c}"], b[f"{rule}/{c}"], atol=1e-6, err_msg=f"{rule}/{c}")
    g = a["greedy/dup_group"]
    assert (g[planted] >= 0).mean() > 0.9  # the planted copies are found
    assert not (tmp / "two" / ".embed-spill").exists()  # the ranks' spill files are removed


def test_partitioned_dedup_equals_dedup_over_every_row_in_memory(jobs):
    """The owners/spill/return machinery gives what the one-matrix dedup gives on the same clusters."""
    from types import SimpleNamespace

    from dataprune.metrics.dedup import dedup_columns, exact_groups
    from dataprune.metrics.embeddings import Clusters, EmbeddingSet

    x, planted, (a, _), _, tmp = jobs
    ids = np.concatenate([np.load(tmp / "cache" / f"ids-{i:06d}.npy") for i in range(len(SIZES))])
    base = pa.concat_tables([pq.read_table(tmp / "cache" / f"base-{i:06d}.parquet") for i in range(len(SIZES))])
    hashes = (base.column("bytes_hash").to_numpy(), base.column("pixel_hash").to_numpy())
    for rule in RULES:
        cfg = SimpleNamespace(dedup_eps=0.02, dedup_keep="hard", dedup_rule=rule, seed=3)
        es = EmbeddingSet(x, np.zeros(len(x), np.int64), ids, hashes, 5, cfg)
        es._clusters = Clusters(6, np.zeros((6, x.shape[1]), np.float32), a[f"{rule}/cluster"], a[f"{rule}/prototypes"])
        ref = dedup_columns(es)
        assert (exact_groups(list(hashes)) >= 0).sum() == 40  # every exact copy shares its cluster here
        for c in ("dup_group", "is_duplicate"):
            np.testing.assert_array_equal(ref[c], a[f"{rule}/{c}"], err_msg=f"{rule}/{c}")
        np.testing.assert_allclose(ref["dup_max_sim"], a[f"{rule}/dup_max_sim"], atol=1e-6)


def test_a_rank_that_dies_mid_kmeans_stops_the_job_with_a_clear_error(jobs, tmp_path):
    _, _, _, _, tmp = jobs
    (tmp_path / "cache").symlink_to(tmp / "cache")
    p, _, secs = _run(tmp_path, "died", 2, die="kmeans", timeout=120)
    assert p.returncode != 0
    assert "rank 0 of 2: another rank stopped during k-means" in p.stderr, p.stderr[-3000:]
    assert secs < 60, secs


def test_tiny_budgets_give_the_same_columns_and_leave_no_spill_files(jobs):
    """Dedup batches of at most 400 rows (of 6 clusters of ~170), chunks of 37 and hash chunks of 29
    (batches of one and of several clusters, many flushes and reads back): every column equals the
    default budgets' (one process and 2 ranks), bit for bit."""
    _, _, (a, ra), (b, rb), tmp = jobs
    p, out, _ = _run(tmp, "tiny", 2, die="tiny")
    assert p.returncode == 0, p.stderr[-3000:]
    t, rt = _columns(out, 2)
    assert 2 < int(rt[0]["greedy/batches"]) < 6  # each rank's ~3 clusters in 2 batches
    assert int(ra[0]["greedy/batches"]) == 1  # the default budget: one batch here
    for k in a:
        np.testing.assert_array_equal(t[k], b[k], err_msg=k)
        if not k.endswith("prototypes"):
            np.testing.assert_array_equal(t[k], a[k], err_msg=k)
    np.testing.assert_array_equal(rt[0]["centroids"], rb[0]["centroids"])  # hashed in chunks of 29: the same sample
    assert sorted(os.listdir(out)) == ["rank0.npz", "rank1.npz"]  # spill files and their directory's files gone


def _ours(d) -> list[str]:
    """What is in ``d`` besides torchrun's own per-job directories (torchelastic_*, left by a failed job)."""
    return [f for f in os.listdir(d) if not f.startswith("torchelastic_")]


def test_a_rank_that_dies_mid_dedup_fails_clearly_and_leaves_nothing_outside_out(jobs, tmp_path):
    _, _, (a, _), _, tmp = jobs
    (tmp_path / "cache").symlink_to(tmp / "cache")
    before = sorted(os.listdir(tmp / "cache"))
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    env = dict(ENV, TMPDIR=str(scratch))
    p, out, secs = _run(tmp_path, "died", 2, die="tiny,dedup", env=env)
    assert p.returncode != 0
    assert "rank 0 of 2: another rank stopped during dedup" in p.stderr, p.stderr[-3000:]
    assert secs < 60, secs
    assert sorted(os.listdir(tmp / "cache")) == before and _ours(scratch) == []
    assert set(os.listdir(tmp_path)) == {"cache", "tmpdir", "died", "job.py"}
    assert os.listdir(out) == [".embed-spill"]  # what the stopped job left is inside OUT only
    p, out, _ = _run(tmp_path, "died", 2, die="tiny", env=env)  # the same command again: finished, spill removed
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["rank0.npz", "rank1.npz"] and _ours(scratch) == []
    t, _ = _columns(out, 2)
    for k in ("greedy/dup_group", "greedy/is_duplicate", "components/dup_group", "semdedup/is_duplicate"):
        np.testing.assert_array_equal(t[k], a[k], err_msg=k)


def test_hash_sample_is_the_same_rows_whatever_the_split():
    rng = np.random.default_rng(1)
    h = rng.integers(0, 2**64 - 1, size=5000, dtype=np.uint64)
    thr = sample_threshold(h, 1234, Comm())
    assert (h <= np.uint64(thr)).sum() == 1234
    assert set(np.flatnonzero(h <= np.uint64(thr))) == set(np.argsort(h)[:1234])
    assert sample_threshold(h, 5000, Comm()) is None


def test_fixed_point_centroids_do_not_depend_on_the_order_of_shards():
    """Block sums added in fixed point: the same shards in another order give identical centroids;
    the rows shuffled (other blocks) agree to float rounding."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((900, 16)).astype(np.float32)
    ids = rng.integers(0, 2**63, size=900, dtype=np.uint64)
    a, n = fit(x, [(0, 300), (300, 900)], ids, 5, Comm(), iters=6, seed=0, sample=None, block=128)
    o = np.r_[300:900, 0:300]
    b, _ = fit(x[o], [(0, 600), (600, 900)], ids[o], 5, Comm(), iters=6, seed=0, sample=None, block=128)
    assert n == 900
    np.testing.assert_array_equal(a, b)
    p = rng.permutation(900)
    np.testing.assert_allclose(fit(x[p], [(0, 900)], ids[p], 5, Comm(), iters=6, seed=0, sample=None)[0], a, atol=1e-5)
    assert FIXED == 2.0**30


def test_owners_balance_pairwise_work_and_rows_read_lazily(tmp_path):
    owner = owners_by_size(np.array([100, 10, 70, 70, 5, 0]), 2)
    assert owner.tolist() == [0, 1, 1, 1, 1, 1]  # 100² alone vs 70² + 70² + 10² + 5²
    a = np.arange(40, dtype=np.float16).reshape(10, 4)
    np.save(tmp_path / "a.npy", a[:6])
    np.save(tmp_path / "b.npy", a[6:])
    rows = ConcatRows([NpyRows(str(tmp_path / "a.npy")), NpyRows(str(tmp_path / "b.npy"))])
    assert rows.shape == (10, 4)
    np.testing.assert_array_equal(rows[3:9], a[3:9])
    np.testing.assert_array_equal(rows[np.array([9, 0, 6, 5])], a[[9, 0, 6, 5]])
    np.testing.assert_array_equal(PickedRows(rows, np.array([7, 8, 9, 1]))[1:3], a[[8, 9]])
    np.testing.assert_array_equal(PickedRows(rows, np.array([7, 8, 9, 1]))[np.array([3, 0])], a[[1, 7]])
    job = JobRows([(0, 4), (4, 4), (4, 10)], [100, 7, 20])  # an empty shard between two
    assert job.shape == (10,)
    np.testing.assert_array_equal(job[2:7], [102, 103, 20, 21, 22])
    np.testing.assert_array_equal(job[np.array([9, 0, 4])], [25, 100, 20])
    ids = np.arange(10, 20, dtype=np.uint64) * np.uint64(2**40)
    np.save(tmp_path / "ids.npy", ids)
    col = NpyColumn(str(tmp_path / "ids.npy"))
    assert col.shape == (10,) and col.dtype == np.uint64
    np.testing.assert_array_equal(col[3:7], ids[3:7])
    np.testing.assert_array_equal(col[8:100], ids[8:])
    np.testing.assert_array_equal(col[np.array([9, 0])], ids[[9, 0]])
    np.testing.assert_array_equal(np.asarray(col), ids)


def _score_args(tmp_path, *, n, shard_size, batch, clusters, sample) -> list[str]:
    """A demo dataset and a random test_resnet checkpoint in ``tmp_path``, and the `dataprune score`
    arguments (after the interpreter) of prototypes, class-prototypes and dedup on them."""
    import timm
    from safetensors.torch import save_file

    from dataprune.demo import make_demo

    make_demo(str(tmp_path / "data"), n=n, shard_size=shard_size)
    torch.manual_seed(0)
    ck = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=10).state_dict().items()}, ck)
    return ["-m", "dataprune.cli", "score", str(tmp_path / "data"), "--metric", "prototypes,class-prototypes,dedup", "--epochs", "0",
            "--checkpoint", str(ck), "--model", "test_resnet", "--workers", "0", "--batch-size", str(batch), "--clusters",
            str(clusters), "--kmeans-sample", str(sample), "--eps", "0.01"]


def test_torchrun_score_stopped_by_sigterm_resumes_to_the_one_process_table(tmp_path):
    """A real `dataprune score` of prototypes, class-prototypes and dedup: 3 shards over 2 ranks,
    stopped by SIGTERM while embedding, resumed; the table equals one process's."""
    args = _score_args(tmp_path, n=150, shard_size=50, batch=4, clusters=5, sample=100)
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    two = [*TORCHRUN, "--master-port", _port(), *args, "--out", str(tmp_path / "two")]
    proc = subprocess.Popen(two, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 120
    cache = tmp_path / "two" / "_embeddings"
    while time.time() < deadline and proc.poll() is None and not list(cache.glob("*/base-*.parquet")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-2000:]  # stopped while embedding
    assert not (tmp_path / "two" / "_dataprune.json").exists() or len(list((tmp_path / "two").glob("parts/*"))) < 3
    p = subprocess.run(two, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    a = pd.read_parquet(tmp_path / "one").sort_values("sample_id").reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "two").sort_values("sample_id").reset_index(drop=True)
    assert len(b) == 150 and b["class_prototypes"].notna().all()
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5)
    for c in ("cluster", "dup_group", "is_duplicate"):
        assert a[c].tolist() == b[c].tolist(), c
    assert not (tmp_path / "two" / ".embed-spill").exists()


def test_torchrun_with_more_ranks_than_shards_equals_one_process(tmp_path):
    """One shard over 2 ranks: rank 1 holds no rows, yet joins every collective (k-means sums, owner
    exchange, dedup) — the job ends and its table equals one process's."""
    args = _score_args(tmp_path, n=60, shard_size=60, batch=8, clusters=4, sample=60)
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*TORCHRUN, "--master-port", _port(), *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    a = pd.read_parquet(tmp_path / "one").sort_values("sample_id").reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "two").sort_values("sample_id").reset_index(drop=True)
    assert len(b) == 60
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5)
    for c in ("cluster", "dup_group", "is_duplicate"):
        assert a[c].tolist() == b[c].tolist(), c
