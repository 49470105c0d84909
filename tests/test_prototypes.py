"""Spherical k-means, nearest-centroid score and class prototypes (dataprune.metrics.prototypes)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dataprune.errors import ConfigError
from dataprune.metrics.kmeans import (
    assign,
    auto_block,
    centroid_sums,
    init_centroids,
    kmeans_backend,
    normalize_rows,
    spherical_kmeans,
)
from dataprune.metrics.prototypes import class_prototype_distance, class_sums


def unit(a):
    a = np.asarray(a, dtype=np.float64)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def clustered(n, dim, k, noise, seed=0):
    """Rows = one of ``k`` random unit centres + Gaussian noise, normalised (float32)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((k, dim)))
    lab = rng.integers(k, size=n)
    x = unit(centres[lab] + noise * rng.standard_normal((n, dim))).astype(np.float32)
    return x, lab, centres


def reference_lloyd(x, c0, iters):
    """Straightforward spherical Lloyd in float64 with per-row Python loops: assign each row to the
    centroid of highest cosine (first on ties), centroid = normalised sum of its rows; an empty
    cluster takes the row farthest from its centroid (lowest best cosine, lower row first)."""
    x = unit(x)
    c = unit(c0)
    n, k = x.shape[0], c.shape[0]
    for _ in range(iters):
        sums = np.zeros_like(c)
        counts = np.zeros(k, dtype=int)
        best = np.empty(n)
        lab = np.empty(n, dtype=int)
        for i in range(n):
            sims = [float(np.dot(x[i], c[j])) for j in range(k)]
            j = int(np.argmax(sims))
            lab[i], best[i] = j, sims[j]
            sums[j] += x[i]
            counts[j] += 1
        far = iter(np.argsort(best, kind="stable"))
        new = np.empty_like(c)
        for j in range(k):
            if counts[j] == 0:
                new[j] = x[next(far)]
            else:
                new[j] = sums[j] / np.linalg.norm(sums[j])
        c = new
    return c


def brute_assign(x, c):
    s = unit(x) @ unit(c).T
    return s.argmax(1), 1.0 - s.max(1)


# ------------------------------------------------------------------------------------------ k-means


def test_torch_kmeans_matches_reference():
    x, _, _ = clustered(300, 8, 5, noise=0.6, seed=1)
    c0 = init_centroids(x, 5, seed=3)
    ours = spherical_kmeans(x, 5, iters=6, init=c0, backend="torch", block=64)
    ref = reference_lloyd(x, c0, 6)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    np.testing.assert_array_equal(assign(x, ours)[0], brute_assign(x, ref)[0])


def test_torch_kmeans_refills_empty_cluster_like_reference():
    x, _, _ = clustered(200, 6, 3, noise=0.3, seed=2)
    x = np.abs(x)  # every row in the positive orthant
    c0 = np.vstack([x[0], x[1], -x.mean(0)])  # the third centroid attracts no row
    assert (assign(x, c0)[0] != 2).all()
    ours = spherical_kmeans(x, 3, iters=4, init=c0, backend="torch", block=50)
    ref = reference_lloyd(x, c0, 4)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    assert np.bincount(assign(x, ours)[0], minlength=3).min() > 0


def test_default_init_is_init_centroids():
    x, _, _ = clustered(500, 16, 6, noise=0.5)
    a = spherical_kmeans(x, 6, iters=3, seed=7, backend="torch")
    b = spherical_kmeans(x, 6, iters=3, seed=7, backend="torch", init=init_centroids(x, 6, seed=7))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_deterministic_for_a_seed(init):
    x, _, _ = clustered(1500, 16, 10, noise=0.5, seed=4)
    a = spherical_kmeans(x, 10, iters=5, seed=11, backend="torch", init=init, sample=700)
    b = spherical_kmeans(torch.from_numpy(x), 10, iters=5, seed=11, backend="torch", init=init, sample=700)
    c = spherical_kmeans(x, 10, iters=5, seed=12, backend="torch", init=init, sample=700)
    np.testing.assert_array_equal(a, b)  # numpy and torch inputs: same rows, same draws
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == (10, 16)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_init_centroids_are_distinct_rows_of_x():
    x, _, _ = clustered(400, 12, 8, noise=0.4)
    for method in ("k-means++", "random"):
        c = init_centroids(x, 8, seed=5, method=method)
        sims = c @ x.T
        assert np.allclose(sims.max(1), 1.0, atol=1e-5)
        assert len(set(sims.argmax(1).tolist())) == 8


def test_kmeans_pp_finds_separated_clusters():
    x, lab, centres = clustered(2000, 32, 12, noise=0.04, seed=6)
    c = spherical_kmeans(x, 12, iters=10, seed=0, backend="torch")
    # every true centre is matched by one centroid
    assert (np.max(unit(centres) @ c.T, axis=1) > 0.99).all()


def test_faiss_and_torch_agree_on_separated_clusters():
    x, _, _ = clustered(3000, 24, 8, noise=0.15, seed=8)
    ct = spherical_kmeans(x, 8, iters=10, seed=1, backend="torch")
    cf = spherical_kmeans(x, 8, iters=10, seed=1, backend="faiss")
    np.testing.assert_allclose(ct, cf, atol=1e-4)  # same init; Lloyd differs only in rounding
    np.testing.assert_array_equal(assign(x, ct)[0], assign(x, cf)[0])


def test_torch_kmeans_is_no_worse_than_faiss_own_kmeans():
    import faiss  # the 'faiss' extra (in the test extra)

    x, _, centres = clustered(3000, 24, 8, noise=0.04, seed=8)
    ct = spherical_kmeans(x, 8, iters=10, seed=1, backend="torch")
    assert (np.max(unit(centres) @ ct.T, axis=1) > 0.99).all()  # k-means++ found every cluster
    km = faiss.Kmeans(24, 8, niter=20, spherical=True, seed=1, nredo=5, verbose=False)
    km.train(x)  # faiss's own random init
    ours = (1.0 - assign(x, ct)[1]).mean()
    theirs = (1.0 - assign(x, km.centroids)[1]).mean()
    assert ours >= theirs - 1e-4


def test_backend_resolution(monkeypatch):
    with pytest.raises(ConfigError):
        kmeans_backend("sklearn")
    assert kmeans_backend("torch") == "torch"
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss → ImportError
    assert kmeans_backend("auto") == "torch"
    with pytest.raises(ConfigError, match="pip install"):
        kmeans_backend("faiss")


def test_kmeans_rejects_bad_options():
    x, _, _ = clustered(20, 4, 2, noise=0.3)
    with pytest.raises(ConfigError):
        spherical_kmeans(x, 21, backend="torch")
    with pytest.raises(ConfigError):
        spherical_kmeans(x, 3, backend="torch", init="bogus")
    with pytest.raises(ValueError):
        spherical_kmeans(x, 3, backend="torch", init=np.ones((2, 4)))


def test_centroid_sums_add_across_shards():
    x, _, _ = clustered(1000, 8, 4, noise=0.5)
    c = init_centroids(x, 4, seed=0)
    s, n, o = centroid_sums(x, c, block=128)
    s1, n1, o1 = centroid_sums(x[:437], c, block=100)
    s2, n2, o2 = centroid_sums(x[437:], c, block=100)
    torch.testing.assert_close(s1 + s2, s, rtol=1e-6, atol=1e-5)  # float32 within a block
    assert torch.equal(n1 + n2, n) and int(n.sum()) == 1000
    assert abs(o1 + o2 - o) < 1e-6 * 1000


def test_auto_block_bounds_tile():
    assert auto_block(1000) * 1000 <= 1 << 23
    assert auto_block(1) == 65536 and auto_block(10**9) == 256


# ------------------------------------------------------------------------------------------ assign


def test_assign_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 16)).astype(np.float32)  # not normalised: assign normalises
    c = rng.standard_normal((7, 16))
    ids, dist = assign(x, c, block=97)
    bid, bdist = brute_assign(x, c)
    assert ids.dtype == np.int32 and dist.dtype == np.float32
    np.testing.assert_array_equal(ids, bid)
    np.testing.assert_allclose(dist, bdist, atol=1e-5)
    assert (dist >= 0).all() and (dist <= 2).all()


def test_assign_accepts_tensor_float16_and_memmap(tmp_path):
    x, _, _ = clustered(500, 8, 3, noise=0.5)
    c = init_centroids(x, 3)
    ref_ids, ref_d = assign(x, c)
    ids, d = assign(torch.from_numpy(x), torch.from_numpy(c), block=64)
    np.testing.assert_array_equal(ids, ref_ids)
    mm = np.lib.format.open_memmap(tmp_path / "emb.npy", mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    ro = np.load(tmp_path / "emb.npy", mmap_mode="r")
    ids16, d16 = assign(ro, c, block=64)
    assert (ids16 == ref_ids).mean() > 0.99
    np.testing.assert_allclose(d16, ref_d, atol=2e-3)


def test_planted_outliers_rank_in_top_decile():
    x, _, _ = clustered(3000, 32, 20, noise=0.08, seed=9)
    rng = np.random.default_rng(10)
    outliers = unit(rng.standard_normal((30, 32))).astype(np.float32)
    data = np.vstack([x, outliers])
    perm = rng.permutation(len(data))
    data = data[perm]
    planted = np.flatnonzero(perm >= 3000)
    for backend in ("torch", "auto"):
        c = spherical_kmeans(data, 20, iters=10, seed=0, backend=backend)
        _, score = assign(data, c)
        cut = np.quantile(score, 0.9)
        assert (score[planted] > cut).all(), backend


# ------------------------------------------------------------------------------------------ classes


def test_class_prototype_distance_matches_brute_force():
    x, lab, _ = clustered(700, 12, 5, noise=0.7, seed=3)
    lab = lab.copy()
    lab[::13] = -1  # unlabelled rows
    got = class_prototype_distance(x, lab, 6, block=50)  # class 5 has no rows
    xn = unit(x)
    want = np.full(len(x), np.nan)
    for cls in range(5):
        m = lab == cls
        p = xn[m].sum(0)
        p /= np.linalg.norm(p)
        want[m] = 1.0 - xn[m] @ p
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(got), lab < 0)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_class_sums_add_across_shards():
    x, lab, _ = clustered(600, 8, 4, noise=0.5)
    s, n = class_sums(x, lab, 4, block=64)
    s1, n1 = class_sums(x[:250], lab[:250], 4)
    s2, n2 = class_sums(x[250:], lab[250:], 4)
    np.testing.assert_allclose(s1 + s2, s, rtol=1e-6, atol=1e-5)  # float32 within a block
    np.testing.assert_array_equal(n1 + n2, n)
    np.testing.assert_allclose(np.linalg.norm(normalize_rows(s), axis=1), 1.0, atol=1e-6)


def test_class_labels_out_of_range():
    x, lab, _ = clustered(50, 4, 3, noise=0.5)
    with pytest.raises(ValueError):
        class_prototype_distance(x, lab, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_is_deterministic():
    x, _, _ = clustered(3000, 24, 8, noise=0.3, seed=8)
    cpu = spherical_kmeans(x, 8, iters=5, backend="torch")
    gpu = spherical_kmeans(x, 8, iters=5, backend="torch", device="cuda")
    np.testing.assert_array_equal(gpu, spherical_kmeans(x, 8, iters=5, backend="torch", device="cuda"))
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)
    ids, d = assign(x, cpu)
    ids_g, d_g = assign(torch.from_numpy(x).cuda(), cpu, device="cuda")
    assert (ids_g == ids).mean() > 0.999
    np.testing.assert_allclose(d_g, d, atol=1e-4)
