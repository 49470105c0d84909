"""Exact and semantic duplicate detection (dataprune.metrics.dedup)."""

from __future__ import annotations

import resource
import tracemalloc

import numpy as np
import pytest

from dataprune.errors import ConfigError
from dataprune.ids import mix64
from dataprune.metrics.dedup import (
    bytes_hash,
    choose_keepers,
    exact_groups,
    pixel_hash,
    semantic_duplicates,
    union_groups,
)
from dataprune.metrics.kmeans import assign, spherical_kmeans


def unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def partition(groups):
    """Set of frozensets of rows per group id (order-free comparison of group arrays)."""
    out = {}
    for i, g in enumerate(np.asarray(groups).tolist()):
        if g >= 0:
            out.setdefault(g, set()).add(i)
    return {frozenset(v) for v in out.values()}


def planted(n_base=4000, n_copies=200, dim=64, k=40, seed=0, copy_noise=0.012):
    """Clustered embeddings plus near-copies of random base rows (cos to the original ≈ 0.995)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((k, dim)))
    base = unit(centres[rng.integers(k, size=n_base)] + 0.1 * rng.standard_normal((n_base, dim)))
    src = rng.integers(n_base, size=n_copies)
    copies = unit(base[src] + copy_noise * rng.standard_normal((n_copies, dim)))
    x = np.vstack([base, copies]).astype(np.float32)
    origin = np.r_[np.arange(n_base), src]  # the base row each row is (a copy of)
    perm = rng.permutation(len(x))
    return x[perm], origin[perm]


def brute_semantic(x, cid, eps):
    """Pairwise similarity of whole clusters, components by a plain Python BFS."""
    x = unit(x)
    n = len(x)
    group = -np.ones(n, dtype=int)
    max_sim = np.full(n, np.nan)
    g = 0
    for c in np.unique(cid[cid >= 0]):
        mem = np.flatnonzero(cid == c)
        s = x[mem] @ x[mem].T
        np.fill_diagonal(s, -np.inf)
        if len(mem) > 1:
            max_sim[mem] = s.max(1)
        adj = s >= 1 - eps
        seen = set()
        for a in range(len(mem)):
            if a in seen or not adj[a].any():
                continue
            stack, comp = [a], set()
            while stack:
                u = stack.pop()
                if u in comp:
                    continue
                comp.add(u)
                stack.extend(np.flatnonzero(adj[u]).tolist())
            seen |= comp
            group[mem[sorted(comp)]] = g
            g += 1
    return group, max_sim


# ------------------------------------------------------------------------------------------ hashes


def test_bytes_and_pixel_hashes():
    a = bytes_hash(b"image bytes")
    assert a == bytes_hash(bytearray(b"image bytes")) and a != bytes_hash(b"image bytez")
    assert 0 < a < 2**64
    img = np.arange(2 * 6 * 3, dtype=np.uint8).reshape(2, 6, 3)
    assert pixel_hash(img) == pixel_hash(img.copy())
    assert pixel_hash(img) != pixel_hash(img.reshape(4, 3, 3))  # same bytes, other shape
    assert pixel_hash(img[:, ::2]) == pixel_hash(np.ascontiguousarray(img[:, ::2]))
    changed = img.copy()
    changed[1, 5, 2] ^= 1
    assert pixel_hash(changed) != pixel_hash(img)
    with pytest.raises(ValueError):
        pixel_hash(img.astype(np.float32))


def test_exact_groups_single_and_multiple_columns():
    h = np.array([5, 0, 5, 7, 0, 7, 7, 9], dtype=np.uint64)
    g = exact_groups(h)
    assert g.dtype == np.int64
    assert g.tolist() == [0, -1, 0, 1, -1, 1, 1, -1]  # 0 = no hash never matches
    by_bytes = np.array([1, 1, 2, 3, 4, 5], dtype=np.uint64)
    by_pixels = np.array([8, 9, 9, 6, 0, 0], dtype=np.uint64)
    g2 = exact_groups([by_bytes, by_pixels])
    assert partition(g2) == {frozenset({0, 1, 2})}  # 0=1 by bytes, 1=2 by pixels
    np.testing.assert_array_equal(g2, exact_groups(np.stack([by_bytes, by_pixels], axis=1)))


def test_union_groups():
    a = np.array([0, 0, -1, 1, 1, -1, -1])
    b = np.array([-1, 3, 3, -1, -1, 2, 2])
    assert partition(union_groups(a, b)) == {frozenset({0, 1, 2}), frozenset({3, 4}), frozenset({5, 6})}
    assert union_groups(a, b).tolist()[0] == 0  # dense ids, numbered by lowest row


# ------------------------------------------------------------------------------------------ keepers


def test_keep_policies():
    g = np.array([0, 0, 0, -1, 1, 1])
    scores = np.array([0.5, 0.1, 0.9, 0.0, np.nan, 0.3])
    ids = np.array([30, 20, 10, 5, 40, 50], dtype=np.uint64)
    assert np.flatnonzero(~choose_keepers(g, "easy", scores=scores) & (g >= 0)).tolist() == [1, 5]
    assert np.flatnonzero(~choose_keepers(g, "hard", scores=scores) & (g >= 0)).tolist() == [2, 5]  # NaN loses
    assert np.flatnonzero(~choose_keepers(g, "first", sample_ids=ids) & (g >= 0)).tolist() == [2, 4]
    assert np.flatnonzero(~choose_keepers(g, "first") & (g >= 0)).tolist() == [0, 4]
    r = choose_keepers(g, "random", sample_ids=ids, seed=3)
    m = mix64(ids, 3)
    assert np.flatnonzero(~r & (g >= 0)).tolist() == [int(np.argmin(np.where(g == 0, m, np.uint64(2**64 - 1)))), 4 + int(m[5] < m[4])]
    assert not r[3]  # a row outside groups is never a duplicate
    for keep in ("easy", "hard", "random", "first"):
        d = choose_keepers(g, keep, scores=scores, sample_ids=ids)
        assert d.sum() == 3  # one keeper per group
    with pytest.raises(ConfigError):
        choose_keepers(g, "biggest")
    with pytest.raises(ValueError):
        choose_keepers(g, "easy")


def test_random_keeper_independent_of_row_order():
    rng = np.random.default_rng(0)
    g = rng.integers(-1, 30, size=300)
    ids = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    kept = set(ids[~choose_keepers(g, "random", sample_ids=ids, seed=9) & (g >= 0)].tolist())
    p = rng.permutation(300)
    kept_p = set(ids[p][~choose_keepers(g[p], "random", sample_ids=ids[p], seed=9) & (g[p] >= 0)].tolist())
    assert kept == kept_p


# ------------------------------------------------------------------------------------------ semantic


def test_semantic_planted_near_duplicates_precision_recall():
    x, origin = planted()
    c = spherical_kmeans(x, 40, iters=10, seed=0, backend="torch")
    cid, _ = assign(x, c)
    res = semantic_duplicates(x, cid, eps=0.02, block=256)
    counts = np.bincount(origin)
    truth = counts[origin] >= 2  # an original with copies, or a copy
    pred = res.dup_group >= 0
    tp = (pred & truth).sum()
    precision, recall = tp / pred.sum(), tp / truth.sum()
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    # one keeper per found group, and members of one planted family share a group
    assert res.is_duplicate.sum() == pred.sum() - len(np.unique(res.dup_group[pred]))
    fam_ok = [len(set(res.dup_group[origin == o].tolist())) == 1 for o in np.flatnonzero(counts >= 2)]
    assert np.mean(fam_ok) >= 0.95
    assert res.dup_group.dtype == np.int64 and res.dup_max_sim.dtype == np.float32 and res.is_duplicate.dtype == bool


@pytest.mark.parametrize("block", [16, 64, 10_000])
def test_semantic_matches_brute_force_across_block_sizes(block):
    x, origin = planted(n_base=600, n_copies=60, dim=16, k=6, seed=2, copy_noise=0.03)
    cid = np.random.default_rng(1).integers(-1, 6, size=600)[origin]  # ~95 rows a cluster; -1 = none
    st = {}
    res = semantic_duplicates(x, cid, eps=0.02, keep="first", rule="components", block=block, stats=st)
    want_g, want_s = brute_semantic(x, cid, 0.02)
    assert partition(res.dup_group) == partition(want_g)
    assert len(partition(want_g)) >= 10
    np.testing.assert_array_equal(np.isnan(res.dup_max_sim), np.isnan(want_s))
    np.testing.assert_allclose(res.dup_max_sim, want_s, atol=1e-5)
    assert np.isnan(res.dup_max_sim[cid < 0]).all() and not res.is_duplicate[cid < 0].any()
    assert st["max_tile_elems"] <= block * block
    if block == 16:
        assert st["tiles"] > 5 * 20  # many tiles per cluster: block boundaries crossed


def test_semantic_easy_keeper_is_closest_to_centroid():
    x, origin = planted(n_base=500, n_copies=80, dim=16, k=4, seed=5, copy_noise=0.03)
    cid, _ = assign(x, spherical_kmeans(x, 4, iters=5, backend="torch"))
    res = semantic_duplicates(x, cid, eps=0.01, keep="easy", rule="components", block=50)
    xn = unit(x)
    cent = np.stack([unit(xn[cid == c].sum(0, keepdims=True))[0] for c in range(4)])
    dist = 1.0 - np.einsum("ij,ij->i", xn, cent[cid])
    for g in np.unique(res.dup_group[res.dup_group >= 0]):
        mem = np.flatnonzero(res.dup_group == g)
        assert mem[~res.is_duplicate[mem]].tolist() == [mem[np.argmin(dist[mem])]]
        hard = semantic_duplicates(x, cid, eps=0.01, keep="hard", rule="components", scores=dist)
        assert not hard.is_duplicate[mem[np.argmax(dist[mem])]]
        break
    rnd = semantic_duplicates(x, cid, eps=0.01, keep="random", rule="components", sample_ids=np.arange(len(x)) * 7, seed=1)
    assert rnd.is_duplicate.sum() == res.is_duplicate.sum()


def test_semantic_memory_bounded_with_one_giant_cluster():
    rng = np.random.default_rng(3)
    n, dim = 12_000, 16
    x = unit(rng.standard_normal((n, dim))).astype(np.float32)
    x[1::500] = unit(x[0::500] + 0.005 * rng.standard_normal((24, dim)))  # 24 planted pairs
    cid = np.where(np.arange(n) < int(0.9 * n), 0, rng.integers(1, 20, size=n))  # 90 % in cluster 0
    rng.shuffle(cid)
    block = 512
    full_bytes = int((cid == 0).sum()) ** 2 * 4  # one cluster x cluster float32 matrix: ~430 MB
    st = {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    res = semantic_duplicates(x, cid, eps=0.001, keep="first", block=block, stats=st)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert st["largest_cluster"] == (cid == 0).sum()
    assert st["max_tile_elems"] <= block * block  # the pairwise work never exceeds one tile
    assert peak < full_bytes / 20  # numpy-side allocations (gathered rows, union-find): O(cluster)
    assert rss1 - rss0 < full_bytes / 4  # and no big torch allocation either
    same = [cid[i] == cid[i + 1] for i in range(0, n, 500)]
    assert sum(same) >= 20 and (res.dup_group >= 0).sum() >= 2 * sum(same)


def test_semantic_rejects_bad_options():
    x = unit(np.random.default_rng(0).standard_normal((10, 4))).astype(np.float32)
    cid = np.zeros(10, dtype=np.int32)
    with pytest.raises(ConfigError):
        semantic_duplicates(x, cid, eps=3.0)
    with pytest.raises(ConfigError):
        semantic_duplicates(x, cid, eps=0.1, keep="largest")
    with pytest.raises(ConfigError):
        semantic_duplicates(x, cid, eps=0.1, rule="union")
    with pytest.raises(ValueError):
        semantic_duplicates(x, cid[:5], eps=0.1)


def test_semantic_identical_rows_and_singletons():
    x = unit(np.random.default_rng(0).standard_normal((6, 8))).astype(np.float32)
    x[3] = x[1]
    cid = np.array([0, 0, 1, 0, 2, -1])
    res = semantic_duplicates(x, cid, eps=1e-5, keep="first")
    assert res.dup_group.tolist() == [-1, 0, -1, 0, -1, -1]
    assert res.is_duplicate.tolist() == [False, False, False, True, False, False]
    assert np.isnan(res.dup_max_sim[[2, 4, 5]]).all()
    assert res.dup_max_sim[1] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_semantic_cuda_matches_cpu():
    x, origin = planted(n_base=1500, n_copies=100, dim=32, k=5, seed=4)
    cid = np.random.default_rng(0).integers(0, 5, size=1500)[origin]
    cpu = semantic_duplicates(x, cid, eps=0.02, block=128)
    gpu = semantic_duplicates(x, cid, eps=0.02, block=128, device="cuda")
    assert partition(gpu.dup_group) == partition(cpu.dup_group)
    np.testing.assert_array_equal(gpu.is_duplicate, cpu.is_duplicate)
    np.testing.assert_allclose(gpu.dup_max_sim, cpu.dup_max_sim, atol=1e-5)


# ------------------------------------------------------------------------------------------ keeper rules


def ref_order(mem, keep, scores, ids, seed):
    """Keeper order from the definition: a Python sort (NaN scores last, ties → lower sample id)."""
    def key(i):
        if keep == "random":
            return (int(mix64(np.array([ids[i]], dtype=np.uint64), seed)[0]), int(ids[i]))
        s = float(scores[i]) if keep != "first" else 0.0
        s = s if keep in ("easy", "first") else -s
        return (np.isnan(s), 0.0 if np.isnan(s) else s, int(ids[i]))
    return sorted(mem.tolist(), key=key)


def brute_rule(x, cid, eps, rule, keep, scores, ids, seed=0):
    """(is_duplicate, dup_group partition, sims) of ``rule`` from its definition, cluster by cluster."""
    xn = unit(x)
    n, thr = len(x), 1 - eps
    is_dup, root = np.zeros(n, dtype=bool), np.arange(n)
    for c in np.unique(cid[cid >= 0]):
        order = ref_order(np.flatnonzero(cid == c), keep, scores, ids, seed)
        kept = []
        for t, p in enumerate(order):
            if rule == "greedy":
                sims = [(xn[p] @ xn[q], -u) for u, q in enumerate(kept)]
                if sims and max(sims)[0] >= thr:
                    is_dup[p], root[p] = True, kept[-max(sims)[1]]
                else:
                    kept.append(p)
            else:  # semdedup: any earlier row, kept or not, strictly above 1 - eps
                sims = [(xn[p] @ xn[q], -u) for u, q in enumerate(order[:t])]
                if sims and max(sims)[0] > thr:
                    is_dup[p], root[p] = True, root[order[-max(sims)[1]]]
    fam = {}
    for i in range(n):
        fam.setdefault(root[i], set()).add(i)
    return is_dup, {frozenset(v) for v in fam.values() if len(v) > 1}


def clustered(n=300, dim=8, k=5, seed=0, noise=0.25, copies=20):
    """Random clustered unit rows, some exact copies (similarity ties), some rows without a cluster."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((k, dim)))
    lab = rng.integers(k, size=n)
    x = unit(centres[lab] + noise * rng.standard_normal((n, dim))).astype(np.float32)
    src, dst = rng.choice(n, size=(2, copies), replace=False)
    x[dst], lab[dst] = x[src], lab[src]
    lab[rng.choice(n, size=10, replace=False)] = -1
    return x, lab


def _no_near_threshold(x, cid, eps):
    xn = unit(x)
    for c in np.unique(cid[cid >= 0]):
        s = xn[cid == c] @ xn[cid == c].T
        assert not (np.abs(s - (1 - eps)) < 2e-6).any(), "a pair sits on the threshold: pick another seed"


@pytest.mark.parametrize("rule", ["greedy", "semdedup"])
@pytest.mark.parametrize("eps", [0.01, 0.05, 0.15])
@pytest.mark.parametrize("keep,block", [("hard", 7), ("easy", 64), ("random", 1000), ("first", 16)])
def test_rule_matches_brute_force_reference(rule, eps, keep, block):
    x, cid = clustered(seed=int(eps * 100))
    _no_near_threshold(x, cid, eps)
    ids = (np.arange(len(x)) * 7919 + 13) % 100_003
    scores = np.round(np.random.default_rng(1).random(len(x)), 1)  # many ties → sample id decides
    scores[::37] = np.nan
    st = {}
    res = semantic_duplicates(x, cid, eps, keep=keep, rule=rule, scores=scores, sample_ids=ids, seed=3, block=block, stats=st)
    want_dup, want_groups = brute_rule(x, cid, eps, rule, keep, scores, ids, seed=3)
    np.testing.assert_array_equal(res.is_duplicate, want_dup)
    assert partition(res.dup_group) == want_groups
    assert want_dup.sum() >= 5 and st["max_tile_elems"] <= block * block
    # one keeper per group, and groups are numbered by their lowest row
    grp = res.dup_group[res.dup_group >= 0]
    assert res.is_duplicate.sum() == grp.size - np.unique(grp).size
    firsts = [np.flatnonzero(res.dup_group == g)[0] for g in np.unique(grp)]
    assert firsts == sorted(firsts) and np.unique(grp).tolist() == list(range(np.unique(grp).size))


def test_default_keeper_order_uses_the_centroid_distance():
    x, cid = clustered(seed=4)
    xn = unit(x)
    cent = np.zeros((cid.max() + 1, x.shape[1]))
    for c in range(cid.max() + 1):
        cent[c] = unit(xn[cid == c].sum(0, keepdims=True))[0]
    dist = np.where(cid >= 0, 1.0 - np.einsum("ij,ij->i", xn, cent[np.maximum(cid, 0)]), np.nan)
    for rule in ("greedy", "semdedup"):
        res = semantic_duplicates(x, cid, 0.05, rule=rule, block=32)  # defaults: keep="hard", like the CLI
        want_dup, want_groups = brute_rule(x, cid, 0.05, rule, "hard", dist, np.arange(len(x)))
        np.testing.assert_array_equal(res.is_duplicate, want_dup)
        given = semantic_duplicates(x, cid, 0.05, rule=rule, centroids=cent, block=32)
        np.testing.assert_array_equal(given.is_duplicate, want_dup)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_leaves_no_orphans_and_semdedup_removes_at_most_components(seed):
    x, cid = clustered(n=400, dim=6, k=4, seed=seed, noise=0.3)
    xn = unit(x)
    for eps in (0.02, 0.08, 0.2):
        g = semantic_duplicates(x, cid, eps, rule="greedy", block=50)
        kept = ~g.is_duplicate
        for i in np.flatnonzero(g.is_duplicate):
            same = (cid == cid[i]) & kept
            assert (xn[same] @ xn[i]).max() >= 1 - eps - 1e-6  # a kept near-copy exists
            mates = np.flatnonzero((g.dup_group == g.dup_group[i]) & kept)
            assert len(mates) == 1 and xn[mates[0]] @ xn[i] >= 1 - eps - 1e-6  # ... and it is its group's keeper
        sd = semantic_duplicates(x, cid, eps, rule="semdedup", block=50)
        comp = semantic_duplicates(x, cid, eps, rule="components", block=50)
        assert g.is_duplicate.sum() <= comp.is_duplicate.sum()
        assert sd.is_duplicate.sum() <= comp.is_duplicate.sum()
        np.testing.assert_allclose(g.dup_max_sim, comp.dup_max_sim, atol=1e-6)
        np.testing.assert_allclose(sd.dup_max_sim, comp.dup_max_sim, atol=1e-6)


def test_dedup_rule_config_and_cli_round_trip(tmp_path):
    import json
    import os
    import subprocess
    import sys

    import timm
    import torch
    from safetensors.torch import save_file

    from dataprune.config import ScoreConfig
    from dataprune.demo import make_demo

    assert ScoreConfig(data="d").dedup_rule == "greedy"
    with pytest.raises(ConfigError, match="--dedup-rule"):
        ScoreConfig(data="d", workers=0, epochs=1, dedup_rule="union").validate()
    make_demo(str(tmp_path / "data"), n=24, shard_size=12)
    torch.manual_seed(0)
    ck = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=10).state_dict().items()}, ck)
    args = [sys.executable, "-m", "dataprune.cli", "score", str(tmp_path / "data"), "--metric", "dedup", "--epochs", "0",
            "--checkpoint", str(ck), "--model", "test_resnet", "--workers", "0", "--clusters", "2", "--eps", "0.01",
            "--dedup-rule", "semdedup", "--out", str(tmp_path / "s")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((tmp_path / "s" / "_dataprune.json").read_text())
    assert meta["metrics"]["dedup"]["params"]["rule"] == "semdedup"
    assert meta["metrics"]["dedup"]["params"]["keep"] == "hard"
