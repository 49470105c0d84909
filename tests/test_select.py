"""`dataprune select`: exact counts, order independence, CCS against the published algorithm, joins, errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune import scoretable, tables
from dataprune.errors import ConfigError, TableError
from dataprune.ids import mix64
from dataprune.select import (SelectConfig, budget, ccs_allocate, class_quotas, largest_remainder, mean_rank,
                              order_key, plan_selection, run_select, top_k_per_group)

SOURCE = {"format": "wds", "path": "/nowhere", "options": {}}


# ----------------------------------------------------------------------------------------- helpers

def rows(n: int, classes: int = 5, seed: int = 0, ties: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    score = rng.random(n).astype(np.float32)
    if ties:
        score = np.round(score * 4).astype(np.float32) / 4  # five distinct values: many ties
    return {
        "sample_id": mix64(np.arange(n, dtype=np.uint64), 99 + seed),
        "shard": np.array([f"shard-{i // 100:03d}" for i in range(n)]),
        "key": np.array([f"{i % 100:05d}" for i in range(n)]),
        "label": rng.integers(0, classes, n).astype(np.int32),
        "el2n": score,
    }


def write_table(path, r: dict[str, np.ndarray], parts: int = 3, order=None, status=None, metrics=("el2n",),
                extra: dict[str, pa.DataType] | None = None, source=SOURCE) -> str:
    """A score table made with the tables.py helpers; ``order`` permutes rows, ``parts`` splits them."""
    n = len(r["sample_id"])
    order = np.arange(n) if order is None else np.asarray(order)
    st = np.array(["ok"] * n, dtype=object) if status is None else np.asarray(status, dtype=object)
    os.makedirs(path, exist_ok=True)
    dict_t = pa.dictionary(pa.int32(), pa.string())
    for p, idx in enumerate(np.array_split(order, parts)):
        arrays = [
            pa.array(r["sample_id"][idx], pa.uint64()),
            pa.array(r["shard"][idx].tolist()).dictionary_encode().cast(dict_t),
            pa.array(r["key"][idx].tolist(), pa.string()),
            pa.array(r["label"][idx], pa.int32()) if "label" in r else pa.nulls(len(idx), pa.int32()),
            pa.array(["/data/" + s for s in r["shard"][idx].tolist()]).dictionary_encode().cast(dict_t),
            pa.array(np.asarray(idx, dtype=np.int64) * 1024),
            pa.array(np.full(len(idx), 1024, dtype=np.int64)),
            pa.array(st[idx].tolist()).dictionary_encode().cast(dict_t),
            pa.nulls(len(idx), pa.string()),
        ]
        fields = list(tables.BASE_FIELDS)
        for m in list(metrics) + list(extra or {}):
            t = (extra or {}).get(m, pa.float32())
            arrays.append(pa.array(r[m][idx], t))
            fields.append(pa.field(m, t))
        scoretable.write_part(str(path), p, pa.Table.from_arrays(arrays, schema=pa.schema(fields)), {"rows": len(idx)})
    meta = scoretable.score_table_meta(source, [f"class{i}" for i in range(10)], [f"shard-{i}" for i in range(parts)],
                                   {m: {"params": {}} for m in metrics})
    scoretable.write_table_meta(str(path), meta)
    return str(path)


def manifest(path) -> tuple[pa.Table, dict]:
    """The manifest's rows sorted by sample_id, dictionary columns decoded (for comparisons)."""
    t, meta = tables.read_manifest(str(path))
    t = t.sort_by("sample_id")
    cols = [pa.chunked_array([c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c for c in col.chunks])
            for col in t.columns]
    return pa.table(dict(zip(t.column_names, cols))).combine_chunks(), meta


def kept_ids(path) -> np.ndarray:
    return np.sort(pq.read_table(str(path), columns=["sample_id"]).column(0).to_numpy())


def cfg(**kw) -> SelectConfig:
    if "count" not in kw:
        kw.setdefault("frac", 0.5)
    return SelectConfig(**kw)


# ------------------------------------------------------------------------------------ pure functions

def test_budget_rounds_half_up_exactly():
    assert budget(10, 0.8) == 8
    assert budget(5, 0.5) == 3  # 2.5 → 3 (exact decimal, not float noise)
    assert budget(2, 0.25) == 1
    assert budget(1_000_000_007, 0.3) == 300_000_002
    assert budget(3, 1.0) == 3
    assert budget(7, count=4) == 4


def test_largest_remainder_exact_and_capped():
    q = largest_remainder(10, [5, 3, 2])  # 10 of 10: everything
    assert q.tolist() == [5, 3, 2]
    q = largest_remainder(7, [40, 35, 25])  # quotas 2.8, 2.45, 1.75 → floors 2,2,1 + 2 largest remainders
    assert q.tolist() == [3, 2, 2] and q.sum() == 7
    q = largest_remainder(2, [1, 1, 1])  # equal remainders: lower index first
    assert q.tolist() == [1, 1, 0]
    q = largest_remainder(9, [1, 1, 1], caps=[1, 5, 5])  # equal shares; the small group keeps all it has
    assert q.tolist() == [1, 4, 4]
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 50, rng.integers(1, 12))
        if sizes.sum() == 0:
            continue
        k = int(rng.integers(1, sizes.sum() + 1))
        for mode in ("proportional", "equal"):
            q = class_quotas(k, sizes, mode)
            assert q.sum() == k and (q <= sizes).all() and (q >= 0).all()
            if mode == "proportional":  # within one of the exact quota
                assert (np.abs(q - k * sizes / sizes.sum()) < 1 + 1e-9).all()
            else:  # water filling: a class below the others' share keeps everything
                level = q[q < sizes].max(initial=0)
                assert ((q == sizes) | (q >= level - 1)).all()


def test_order_key_sorts_like_floats():
    x = np.array([-np.inf, -3.5, -0.0, 0.0, 1e-30, 2.0, np.inf], dtype=np.float32)
    assert (np.diff(order_key(x).astype(np.int64)) >= 0).all()
    assert order_key(x)[2] == order_key(x)[3]  # -0.0 == 0.0
    y = np.random.default_rng(1).normal(size=1000)
    assert (np.argsort(order_key(y), kind="stable") == np.argsort(y, kind="stable")).all()


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_keeps_exactly_the_extreme_rows(largest):
    r = rows(2000)
    ids, s, lab = r["sample_id"], r["el2n"], r["label"]
    keep = top_k_per_group(order_key(s), [700], ids, 0, largest=largest)
    assert keep.sum() == 700
    ref = np.argsort(-s if largest else s, kind="stable")[:700]
    assert set(np.flatnonzero(keep)) == set(ref)
    quotas = np.array([10, 0, 50, 400, 3])
    counts = np.bincount(lab, minlength=5)
    quotas = np.minimum(quotas, counts)
    keep = top_k_per_group(order_key(s), quotas, ids, 0, codes=lab, largest=largest)
    for c in range(5):
        m = lab == c
        assert keep[m].sum() == quotas[c]
        if quotas[c]:
            kept, rest = s[m & keep], s[m & ~keep]
            if len(rest):
                assert (kept.min() >= rest.max()) if largest else (kept.max() <= rest.min())


def test_ties_broken_by_hash_not_row_order():
    r = rows(3000, ties=True)
    ids, s, lab = r["sample_id"], r["el2n"], r["label"]
    perm = np.random.default_rng(5).permutation(len(ids))
    quotas = (np.bincount(lab) * 0.3).astype(int)
    a = top_k_per_group(order_key(s), quotas, ids, 7, codes=lab)
    b = top_k_per_group(order_key(s[perm]), quotas, ids[perm], 7, codes=lab[perm])
    assert set(ids[a]) == set(ids[perm][b])
    c = top_k_per_group(order_key(s), quotas, ids, 8, codes=lab)
    assert set(ids[a]) != set(ids[c])  # the seed decides ties
    # within a tie, the larger hash counts as harder
    h = mix64(ids, 7)
    for g in range(5):
        m = lab == g
        t = s[m & a].min()
        tied = m & (s == t)
        assert h[tied & a].min() > h[tied & ~a].max()


def test_mean_rank_average_ties():
    a = np.array([1.0, 2.0, 2.0, 3.0])
    b = np.array([4.0, 3.0, 2.0, 1.0])
    # average ranks: a → 0, 1.5, 1.5, 3; b → 3, 2, 1, 0; each scaled by 1/3, then averaged
    assert np.allclose(mean_rank([a, b]), [0.5, 3.5 / 6, 2.5 / 6, 0.5])


# ----------------------------------------------------------------------------------------------- CCS

def reference_ccs(scores: np.ndarray, n_total: int, frac: float, beta: float, k: int):
    """A direct transcription of Algorithm 1 of Zheng et al. (ICLR 2023) and its released code
    (`mislabel_mask` + `stratified_sampling` + `bin_allocate`), with loops and masks."""
    order = np.argsort(-scores, kind="stable")
    kept = scores[order[int(beta * n_total):]]  # drop the floor(beta n) hardest
    m = int(frac * n_total + 0.5)  # coreset budget
    lo, hi = kept.min(), kept.max()
    step = (hi - lo) / k
    sizes = []
    for i in range(k):
        start, end = lo + i * step, lo + (i + 1) * step
        mask = (kept >= start) & ((kept < end) if i < k - 1 else (kept <= hi))  # the code stretches hi by 1.0001
        sizes.append(int(mask.sum()))
    budgets = [0] * k
    rest = m
    for j, i in enumerate(sorted(range(k), key=lambda i: (sizes[i], i))):
        cur = min(sizes[i], rest // (k - j))
        budgets[i] = cur
        rest -= cur
    return sizes, budgets


@pytest.mark.parametrize("frac,beta,k", [(0.3, 0.0, 50), (0.1, 0.1, 50), (0.7, 0.2, 10), (0.05, 0.0, 7)])
def test_ccs_matches_published_algorithm(frac, beta, k):
    rng = np.random.default_rng(3)
    n = 5000
    scores = np.concatenate([rng.beta(2, 5, n - 300), rng.uniform(0.8, 1.0, 300)]).astype(np.float32)  # skewed
    ids = mix64(np.arange(n, dtype=np.uint64), 1)
    sel = plan_selection(SelectConfig(strategy="ccs", frac=frac, ccs_beta=beta, ccs_strata=k), ids, scores, None)
    sizes, budgets = reference_ccs(scores.astype(np.float64), n, frac, beta, k)
    assert [s["rows"] for s in sel.strata] == sizes
    assert [s["kept"] for s in sel.strata] == budgets
    assert sel.keep.sum() == sum(budgets) == budget(n, frac)
    assert sel.dropped_hardest == int(beta * n)
    hardest = np.argsort(-scores, kind="stable")[: int(beta * n)]
    assert not sel.keep[hardest].any()
    # inside each stratum the kept rows are those with the smallest seeded hash (a uniform sample)
    rest = np.ones(n, bool)
    rest[hardest] = False
    s64 = scores.astype(np.float64)
    lo, hi = s64[rest].min(), s64[rest].max()
    step = (hi - lo) / k
    h = mix64(ids, 0)
    for i in range(k):
        m = rest & (s64 >= lo + i * step) & ((s64 < lo + (i + 1) * step) if i < k - 1 else True)
        assert sel.keep[m].sum() == budgets[i]
        if budgets[i] and (m & ~sel.keep).any():
            assert h[m & sel.keep].max() < h[m & ~sel.keep].min()


def test_ccs_allocation_is_exact_when_the_budget_fits():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, 40, (3, int(rng.integers(1, 30))))
        budgets = [int(rng.integers(0, s.sum() + 1)) for s in sizes]
        got = ccs_allocate(budgets, sizes)
        assert (got.sum(axis=1) == budgets).all() and (got <= sizes).all()


def test_ccs_class_balanced_and_order_independent(tmp_path):
    r = rows(3000, classes=4)
    a = write_table(tmp_path / "a", r, parts=2)
    b = write_table(tmp_path / "b", r, parts=5, order=np.random.default_rng(1).permutation(3000))
    c = cfg(strategy="ccs", frac=0.4, ccs_beta=0.05, ccs_strata=20, class_balanced=True)
    ra = run_select([a], c, str(tmp_path / "a.parquet"))
    run_select([b], c, str(tmp_path / "b.parquet"))
    assert (kept_ids(tmp_path / "a.parquet") == kept_ids(tmp_path / "b.parquet")).all()
    pcl = ra["summary"]["per_class"]
    assert sum(pcl["kept"]) == budget(3000, 0.4)
    exp = class_quotas(budget(3000, 0.4), np.array(pcl["candidates"]))
    assert pcl["kept"] == exp.tolist()


# ------------------------------------------------------------------------------------- run_select

@pytest.mark.parametrize("keep", ["hard", "easy", "random"])
@pytest.mark.parametrize("balanced", [False, True])
def test_same_manifest_from_shuffled_rows_and_split_files(tmp_path, keep, balanced):
    r = rows(2500, ties=True)
    a = write_table(tmp_path / "a", r, parts=1)
    b = write_table(tmp_path / "b", r, parts=7, order=np.random.default_rng(2).permutation(2500))
    c = cfg(keep=keep, frac=0.37, class_balanced=balanced, seed=3)
    ra = run_select([a], c, str(tmp_path / "a.parquet"))
    rb = run_select([b], c, str(tmp_path / "b.parquet"))
    ta, ma = manifest(tmp_path / "a.parquet")
    tb, mb = manifest(tmp_path / "b.parquet")
    assert ta.num_rows == budget(2500, 0.37) == ra["summary"]["kept"] == rb["summary"]["kept"]
    assert ta.equals(tb)
    assert ma["selection"]["summary"]["per_class"] == mb["selection"]["summary"]["per_class"]
    assert set(tables.LOCATION_COLUMNS) <= set(ta.column_names)
    assert ("el2n" in ta.column_names) == (keep != "random")  # the score columns used, and only those
    if keep != "random":
        s, kept = r["el2n"], np.isin(r["sample_id"], ta.column("sample_id").to_numpy())
        groups = r["label"] if balanced else np.zeros(2500, int)
        for g in np.unique(groups):
            m = groups == g
            if (m & ~kept).any() and (m & kept).any():
                if keep == "hard":
                    assert s[m & kept].min() >= s[m & ~kept].max()
                else:
                    assert s[m & kept].max() <= s[m & ~kept].min()


def test_class_quotas_exact(tmp_path):
    r = rows(1000, classes=3)
    r["label"][:] = np.repeat([0, 1, 2], [700, 250, 50])
    t = write_table(tmp_path / "t", r)
    s = run_select([t], cfg(frac=0.3, class_balanced=True), str(tmp_path / "p.parquet"))["summary"]
    assert s["per_class"]["kept"] == [210, 75, 15]
    s = run_select([t], cfg(frac=0.3, class_balanced=True, class_quota="equal"), str(tmp_path / "e.parquet"))["summary"]
    assert s["per_class"]["kept"] == [125, 125, 50]  # 100 each, but class 2 has only 50: the rest goes to the others
    s = run_select([t], cfg(count=7, class_balanced=True), None, dry_run=True)["summary"]
    assert s["per_class"]["kept"] == [5, 2, 0] and s["kept"] == 7  # 4.9, 1.75, 0.35 → largest remainders


def test_status_nan_filters_and_drop_hardest(tmp_path):
    r = rows(1000)
    status = np.array(["ok"] * 1000, dtype=object)
    status[:40] = "decode_error"
    r["el2n"][100:110] = np.nan
    t = write_table(tmp_path / "t", r, status=status)
    with pytest.raises(TableError, match="--nan drop"):
        run_select([t], cfg(), None, dry_run=True)
    s = run_select([t], cfg(nan="drop", frac=0.5), None, dry_run=True)["summary"]
    assert s["candidates"] == 950 and s["kept"] == 475
    assert s["excluded"] == {"status:decode_error": 40, "nan": 10}
    s = run_select([t], cfg(nan="drop", frac=0.5, min_score=0.1, max_score=0.9), None, dry_run=True)["summary"]
    lo, hi = s["score_range"]["kept"]
    assert lo >= 0.1 and hi <= 0.9 and s["kept"] == budget(s["candidates"], 0.5)
    out = tmp_path / "d.parquet"
    s = run_select([t], cfg(nan="drop", frac=0.5, drop_hardest=0.1), str(out))["summary"]
    assert s["dropped_hardest"] == 95 and s["kept"] == 475
    kept = np.isin(r["sample_id"], kept_ids(out))
    ok = (status == "ok") & ~np.isnan(r["el2n"])
    order = np.argsort(-np.where(ok, r["el2n"], -1))
    assert not kept[order[:95]].any() and kept[order[95:95 + 475]].all()
    with pytest.raises(ConfigError, match="remain after --drop-hardest"):
        run_select([t], cfg(nan="drop", frac=0.95, drop_hardest=0.1), None, dry_run=True)


def test_dedup_before_fraction(tmp_path):
    r = rows(1000)
    r["is_duplicate"] = np.zeros(1000, bool)
    r["is_duplicate"][::4] = True
    r["dup_max_sim"] = np.random.default_rng(0).random(1000).astype(np.float32)
    t = write_table(tmp_path / "t", r, metrics=("el2n",), extra={"is_duplicate": pa.bool_(), "dup_max_sim": pa.float32()})
    out = tmp_path / "m.parquet"
    s = run_select([t], cfg(frac=0.5, dedup=True), str(out))["summary"]
    assert s["excluded"]["duplicate"] == 250 and s["candidates"] == 750 and s["kept"] == 375
    assert not np.isin(kept_ids(out), r["sample_id"][r["is_duplicate"]]).any()
    # a separate dedup table joins on sample_id
    d = {k: r[k] for k in ("sample_id", "shard", "key", "label", "is_duplicate", "dup_max_sim")}
    dt = write_table(tmp_path / "dedup", d, metrics=(), extra={"is_duplicate": pa.bool_(), "dup_max_sim": pa.float32()})
    e = write_table(tmp_path / "e", {k: r[k] for k in ("sample_id", "shard", "key", "label", "el2n")})
    s2 = run_select([e, dt], cfg(frac=0.5, dedup=True), str(tmp_path / "m2.parquet"))["summary"]
    assert s2["excluded"] == s["excluded"]
    assert (kept_ids(tmp_path / "m2.parquet") == kept_ids(out)).all()
    with pytest.raises(ConfigError, match="--dedup needs"):
        run_select([e], cfg(dedup=True), None, dry_run=True)


def test_mean_rank_combination(tmp_path):
    r = rows(600)
    r["forgetting"] = np.random.default_rng(9).integers(0, 5, 600).astype(np.float32)
    t = write_table(tmp_path / "t", r, metrics=("el2n", "forgetting"))
    with pytest.raises(ConfigError, match=r"several metrics \(el2n, forgetting\)"):
        run_select([t], cfg(), None, dry_run=True)
    out = tmp_path / "m.parquet"
    run_select([t], cfg(by=("el2n", "forgetting"), frac=0.25), str(out))
    m, meta = manifest(out)
    assert {"el2n", "forgetting", "mean_rank"} <= set(m.column_names)
    combined = mean_rank([r["el2n"], r["forgetting"]])
    kept = np.isin(r["sample_id"], m.column("sample_id").to_numpy())
    assert kept.sum() == 150 and combined[kept].min() >= combined[~kept].max()
    assert meta["selection"]["by"] == ["el2n", "forgetting"]


def test_foreign_csv_joins(tmp_path):
    r = rows(500)
    t = write_table(tmp_path / "t", r)
    sub = np.arange(0, 480)  # 20 table rows have no foreign score
    fg = np.random.default_rng(4).random(500)
    lines = ["shard,key,forgetting"] + [f"{r['shard'][i]},{r['key'][i]},{fg[i]}" for i in sub] + ["shard-999,00001,0.5"]
    (tmp_path / "f.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "m.parquet"
    res = run_select([t, str(tmp_path / "f.csv")], cfg(by=("forgetting",), frac=0.5), str(out))
    s = res["summary"]
    assert s["joins"][0]["missing"] == 20 and s["joins"][0]["extra"] == 1 and s["joins"][0]["on"] == "shard/key"
    assert s["candidates"] == 480 and s["kept"] == 240
    m, _ = manifest(out)
    kept = np.isin(r["sample_id"], m.column("sample_id").to_numpy())
    assert fg[kept].min() >= fg[sub][~kept[sub]].max()
    assert m.column("forgetting").type == pa.float64()
    with pytest.raises(TableError, match="--join strict: 20 selectable rows"):
        run_select([t, str(tmp_path / "f.csv")], cfg(by=("forgetting",), join="strict"), None, dry_run=True)
    # sample_id join, parquet file; el2n and a foreign score combined
    pq.write_table(pa.table({"sample_id": pa.array(r["sample_id"]), "memo": pa.array(fg)}), tmp_path / "g.parquet")
    s = run_select([str(tmp_path / "g.parquet"), t], cfg(by=("el2n", "memo"), frac=0.1), None, dry_run=True)["summary"]
    assert s["joins"][0]["on"] == "sample_id" and s["kept"] == 50
    # key alone is ambiguous when keys repeat across shards
    (tmp_path / "k.csv").write_text("key,x\n00001,1.0\n")
    with pytest.raises(ConfigError, match="keys repeat across shards"):
        run_select([t, str(tmp_path / "k.csv")], cfg(by=("x",)), None, dry_run=True)


def test_foreign_file_alone_needs_locations(tmp_path):
    ids = mix64(np.arange(100, dtype=np.uint64), 0)
    pq.write_table(pa.table({"sample_id": pa.array(ids), "label": pa.array(np.arange(100) % 3, pa.int32()),
                             "score": pa.array(np.linspace(0, 1, 100))}), tmp_path / "s.parquet")
    s = run_select([str(tmp_path / "s.parquet")], cfg(frac=0.1, class_balanced=True), None, dry_run=True)["summary"]
    assert s["kept"] == 10 and sum(s["per_class"]["kept"]) == 10
    with pytest.raises(ConfigError, match="--data DATASET"):
        run_select([str(tmp_path / "s.parquet")], cfg(frac=0.1), str(tmp_path / "m.parquet"))
    assert not (tmp_path / "m.parquet").exists()


def test_option_errors(tmp_path):
    r = rows(100)
    del r["label"]
    t = write_table(tmp_path / "t", r)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        run_select([t], SelectConfig(frac=1.5), None, dry_run=True)
    with pytest.raises(ConfigError, match="exactly one"):
        run_select([t], SelectConfig(), None, dry_run=True)
    with pytest.raises(ConfigError, match="more than the 100 selectable"):
        run_select([t], SelectConfig(count=101), None, dry_run=True)
    with pytest.raises(ConfigError, match="unknown metric 'aum'; available: el2n"):
        run_select([t], cfg(by=("aum",)), None, dry_run=True)
    with pytest.raises(ConfigError, match="needs labels"):
        run_select([t], cfg(class_balanced=True), None, dry_run=True)
    with pytest.raises(ConfigError, match="leave out --keep"):
        run_select([t], cfg(strategy="ccs", keep="hard"), None, dry_run=True)
    with pytest.raises(ConfigError, match="no such file"):
        run_select([str(tmp_path / "missing")], cfg(), None, dry_run=True)
    with pytest.raises(TableError, match="not a dataprune score table"):
        run_select([str(tmp_path)], cfg(), None, dry_run=True)
    with pytest.raises(ConfigError, match="inside the input"):
        run_select([t], cfg(), os.path.join(t, "m.parquet"))
    with pytest.raises(ConfigError, match="is a directory"):
        run_select([t], cfg(), str(tmp_path))


def test_strategy_names_are_checked_by_the_registry_in_the_old_order():
    from dataprune.config import default
    from dataprune.select import validate

    ids, score = mix64(np.arange(50, dtype=np.uint64), 0), np.linspace(0, 1, 50)
    for c, msg in [(cfg(strategy="xx"), "--strategy must be one of plain, ccs, not 'xx'"),
                   (cfg(keep="ccs"), "--keep must be one of hard, easy, random, not 'ccs'"),
                   (cfg(strategy="ccs", drop_hardest=0.1), "leave out --drop-hardest"),
                   (cfg(ccs_strata=10), "--ccs-beta and --ccs-strata need --strategy ccs"),
                   (cfg(ccs_beta=0.1), "--ccs-beta and --ccs-strata need --strategy ccs"),
                   (SelectConfig(strategy="xx"), "exactly one"),  # --frac/--count first, as before
                   (cfg(keep="yy", class_quota="zz"), "--keep must be one of"),  # names before the other numbers
                   (cfg(strategy="xx", ccs_strata=0), "--strategy must be one of")]:
        with pytest.raises(ConfigError, match=msg):
            validate(c)
        if c.frac is not None:
            with pytest.raises(ConfigError, match=msg):
                plan_selection(c, ids, score, None)  # callers of plan_selection alone (curve) get the names checked
    validate(cfg(ccs_strata=default(SelectConfig, "ccs_strata")))
    assert plan_selection(cfg(strategy="ccs", ccs_strata=7), ids, score, None).keep.sum() == 25


# ---------------------------------------------------------------------------------------- end to end

def _cli(args, cwd, check=True):
    env = dict(os.environ, COLUMNS="200", PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-m", "dataprune.cli", *args], cwd=cwd, capture_output=True, text=True, env=env)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_cli_used_by_line_defaults_and_errors(tmp_path):
    r = rows(400)
    r["aum"] = np.random.default_rng(1).random(400).astype(np.float32)
    write_table(tmp_path / "dataprune-out" / "scores", r)
    p = _cli(["select", "--keep", "hard", "--frac", "0.8"], tmp_path)
    assert "wrote 320 rows to dataprune-out/manifest.parquet" in p.stdout and "next: dataprune export" in p.stdout
    _, meta = manifest(tmp_path / "dataprune-out" / "manifest.parquet")
    assert meta["selection"]["frac"] == 0.8 and meta["selection"]["inputs"][0]["fingerprint"]
    assert meta["source"] == SOURCE
    p = _cli(["select", "--frac", "0.8", "--by", "nope"], tmp_path, check=False)
    assert p.returncode == 2 and "unknown metric 'nope'; available: el2n" in p.stderr and "Traceback" not in p.stderr
    p = _cli(["select", "--frac", "2"], tmp_path / "dataprune-out", check=False)
    assert p.returncode == 2 and "run `dataprune score" in p.stderr
    p = _cli(["select", "--count", "5", "--class-balanced", "--dry-run", "--json"], tmp_path)
    assert json.loads(p.stdout)["summary"]["kept"] == 5
    # no torch/timm for select (checked in a fresh interpreter running the command)
    code = ("import sys; from dataprune.cli import app\n"
            "try: app(['select', '--frac', '0.5', '--out', 'x.parquet'])\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "bad = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]\n"
            "assert not bad, bad\nprint('clean')")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0 and "clean" in p.stdout, p.stdout + p.stderr


def test_select_then_export_end_to_end(tmp_path):
    from dataprune.demo import make_demo
    from dataprune.export import ExportConfig, export
    from dataprune.sources import open_source

    data = str(tmp_path / "data")
    make_demo(data, n=200, shard_size=50)
    src = open_source(data)
    scores_dir = tmp_path / "scores"
    os.makedirs(scores_dir)
    shards = src.list_shards()
    for sh in shards:
        buf = tables.RowBuffer()
        for s in src.iter_samples(sh):
            buf.add(s)
        ids = np.array(buf.cols["sample_id"], dtype=np.uint64)
        el2n = pa.array((mix64(ids, 1) >> np.uint64(40)).astype(np.float32) / (1 << 24))
        scoretable.write_part(str(scores_dir), sh.index, buf.table({"el2n": el2n}), {"rows": len(buf)})
    scoretable.write_table_meta(str(scores_dir), scoretable.score_table_meta(src.spec(), src.classes, [s.name for s in shards],
                                                                     {"el2n": {"params": {}}}))
    out = tmp_path / "m.parquet"
    res = run_select([str(scores_dir)], cfg(frac=0.3, class_balanced=True), str(out))
    assert res["summary"]["kept"] == 60
    idx = export(str(out), ExportConfig(to="list", out=str(tmp_path / "exp")))
    assert idx["samples"] == 60
    listed = (tmp_path / "exp" / "keys.txt").read_text().split("\n")
    m, _ = manifest(out)
    assert sorted(x for x in listed if x) == sorted(f"{s}\t{k}" for s, k in zip(m.column("shard").to_pylist(),
                                                                                 m.column("key").to_pylist()))
    idx = export(str(out), ExportConfig(to="wds", out=str(tmp_path / "wds")))
    assert idx["samples"] == 60 and not idx["skipped"]
    # foreign scores keyed by (shard, key) plus --data give an exportable manifest too
    lines = ["shard,key,memo"] + [f"{s},{k},{i}" for i, (s, k) in enumerate(zip(m.column("shard").to_pylist(),
                                                                                  m.column("key").to_pylist()))]
    (tmp_path / "memo.csv").write_text("\n".join(lines) + "\n")
    res = run_select([str(tmp_path / "memo.csv")], cfg(frac=0.5, nan="drop"), str(tmp_path / "f.parquet"), data=data)
    assert res["summary"]["kept"] == 30 and res["summary"]["joins"][0]["missing"] == 140
    idx = export(str(tmp_path / "f.parquet"), ExportConfig(to="list", out=str(tmp_path / "exp2")))
    assert idx["samples"] == 30


def test_a_part_file_of_our_table_points_to_its_directory(tmp_path):
    from dataprune.errors import ConfigError
    from dataprune.select import open_input
    from dataprune.tables import atomic_write_json

    os.makedirs(tmp_path / "t")
    (tmp_path / "t" / "part-000000.parquet").write_bytes(b"x")
    atomic_write_json(str(tmp_path / "t" / "_dataprune.json"), {"kind": "scores"})
    with pytest.raises(ConfigError, match="pass the table's directory"):
        open_input(str(tmp_path / "t" / "part-000000.parquet"))


def test_a_class_that_keeps_no_row_is_named_in_a_warning(tmp_path):
    r = rows(500, classes=5, seed=4)
    easy = r["label"] == 3
    r["el2n"][easy] = r["el2n"][easy] * np.float32(0.01)  # class 3 is the easiest: --keep hard --frac 0.8 drops it all
    status = np.where(r["label"] == 4, "bad_label", "ok")  # class 4 has rows, but none is selectable
    t = write_table(tmp_path / "t", r, status=status)
    out = tmp_path / "m.parquet"
    res = run_select([t], cfg(frac=0.5), str(out))
    n3, n4 = int(easy.sum()), int((r["label"] == 4).sum())
    assert res["summary"]["classes_lost"] == [{"label": 3, "name": "class3", "rows": n3, "candidates": n3},
                                              {"label": 4, "name": "class4", "rows": n4, "candidates": 0}]
    w3, w4 = res["warnings"]
    assert w3.startswith(f"class 3 (class3) keeps none of its {n3} rows ({n3} selectable): --keep hard --frac 0.5")
    assert w4.startswith(f"class 4 (class4) keeps none of its {n4} rows: none was selectable")
    _, meta = manifest(out)  # the plan in the manifest's metadata counts them too
    assert [c["label"] for c in meta["selection"]["summary"]["classes_lost"]] == [3, 4]
    # every class keeps rows: no warning (also in a dry run); class-balanced quotas keep each class
    ok = run_select([t], cfg(frac=0.5, class_balanced=True), dry_run=True)
    assert [c["label"] for c in ok["summary"]["classes_lost"]] == [4] and len(ok["warnings"]) == 1
    r["label"][r["label"] == 4] = 0
    t2 = write_table(tmp_path / "t2", r)
    fine = run_select([t2], cfg(frac=0.9), dry_run=True)
    assert fine["summary"]["classes_lost"] == [] and fine["warnings"] == []
    unlabelled = {k: v for k, v in r.items() if k != "label"}
    none = run_select([write_table(tmp_path / "t3", unlabelled)], cfg(frac=0.1), dry_run=True)
    assert none["warnings"] == [] and none["summary"]["classes_lost"] == []
