"""Contract tests over the selection-strategy registry: register a strategy and these run it.

Every strategy, on random ids, scores (with ties) and labels (some missing), must keep exactly the
budget, choose the same sample ids whatever the row order, give every class exactly its quota under
``--class-balanced``, and make the same choice again for the same seed.
"""

from __future__ import annotations

import numpy as np
import pytest

from dataprune.errors import ConfigError
from dataprune.ids import mix64
from dataprune.select import (Pool, budget, check_keeps, class_quotas, config_for, get_strategy, list_strategies,
                              order_key, plan_selection, register, top_k_per_group, unregister)


def data(n: int = 3000, seed: int = 0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    ids = mix64(rng.permutation(n).astype(np.uint64), 1000 + seed)
    score = (np.round(rng.beta(2, 5, n) * 40) / 40).astype(dtype)  # 41 distinct values: many ties
    labels = rng.choice(7, n, p=[0.35, 0.2, 0.15, 0.1, 0.1, 0.06, 0.04]).astype(np.int32)
    labels[rng.random(n) < 0.03] = -1  # a few unlabelled rows: one more group
    return ids, score, labels


def choose(name, ids, score, labels, **options):
    return plan_selection(config_for(name, **options), ids, score, labels)


def expected_quotas(k: int, labels: np.ndarray, mode: str):
    """Class order of the selection: the class numbers ascending, unlabelled last."""
    groups = sorted(set(labels[labels >= 0].tolist())) + ([-1] if (labels < 0).any() else [])
    sizes = np.array([np.count_nonzero(labels == g) for g in groups])
    return groups, class_quotas(k, sizes, mode)


def test_registry_holds_the_four_strategies_and_one_keep_vocabulary():
    assert list_strategies()[:4] == ["hard", "easy", "random", "ccs"]
    for name in list_strategies():
        s = get_strategy(name)
        assert s.name == name and callable(s.choose) and s.flag in ("keep", "strategy")
    check_keeps(list_strategies())
    with pytest.raises(ConfigError, match=r"--keep takes hard, easy, random, ccs \(comma-separated\), not best"):
        check_keeps(["hard", "best"])
    with pytest.raises(ConfigError, match="unknown selection strategy 'best'"):
        get_strategy("best")


@pytest.mark.parametrize("name", list_strategies())
@pytest.mark.parametrize("frac,count", [(0.37, None), (0.05, None), (1.0, None), (None, 1), (None, 1234)])
def test_keeps_exactly_the_budget(name, frac, count):
    ids, score, labels = data()
    sel = choose(name, ids, score, labels, frac=frac, count=count)
    assert sel.keep.dtype == bool and len(sel.keep) == len(ids)
    assert int(sel.keep.sum()) == sel.budget == budget(len(ids), frac, count)


@pytest.mark.parametrize("name", list_strategies())
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_independent_of_row_order(name, balanced, dtype):
    ids, score, labels = data(seed=1, dtype=dtype)
    a = choose(name, ids, score, labels, frac=0.3, class_balanced=balanced, seed=5)
    for p in range(3):
        perm = np.random.default_rng(p).permutation(len(ids))
        b = choose(name, ids[perm], score[perm], labels[perm], frac=0.3, class_balanced=balanced, seed=5)
        assert set(ids[a.keep].tolist()) == set(ids[perm][b.keep].tolist())
        assert b.per_class == a.per_class and b.strata == a.strata


@pytest.mark.parametrize("name", list_strategies())
@pytest.mark.parametrize("mode", ["proportional", "equal"])
@pytest.mark.parametrize("frac", [0.1, 0.45, 0.9])
def test_class_balanced_keeps_each_class_quota(name, mode, frac):
    ids, score, labels = data(seed=2)
    sel = choose(name, ids, score, labels, frac=frac, class_balanced=True, class_quota=mode)
    groups, quotas = expected_quotas(budget(len(ids), frac), labels, mode)
    kept = [int(np.count_nonzero(sel.keep & (labels == g))) for g in groups]
    assert kept == quotas.tolist()
    assert sel.per_class["kept"] == kept and sel.per_class["label"] == [g if g >= 0 else None for g in groups]


@pytest.mark.parametrize("name", list_strategies())
@pytest.mark.parametrize("balanced", [False, True])
def test_deterministic_under_a_seed(name, balanced):
    ids, score, labels = data(seed=3)
    runs = [choose(name, ids.copy(), score.copy(), labels.copy(), frac=0.25, class_balanced=balanced, seed=s)
            for s in (11, 11, 12)]
    assert (runs[0].keep == runs[1].keep).all()
    assert runs[0].per_class == runs[1].per_class and runs[0].strata == runs[1].strata
    assert int(runs[2].keep.sum()) == int(runs[0].keep.sum())  # another seed: another tie break, same budget


def test_a_registered_strategy_is_reachable_by_its_name():
    """Adding a strategy is one function and one ``register`` line; ``select --keep`` and
    ``curve --keep`` accept the name at once."""

    @register("middle")
    def middle(p: Pool):
        """The rows closest to the median score of the pool (a toy)."""
        dist = np.abs(p.score.astype(np.float64) - np.median(p.score))
        return top_k_per_group(order_key(-dist), p.quotas, p.ids, p.cfg.seed, codes=p.codes), None

    try:
        assert "middle" in list_strategies()
        check_keeps(["middle", "hard"])
        ids, score, labels = data(seed=4)
        sel = choose("middle", ids, score, labels, frac=0.2, class_balanced=True)
        assert int(sel.keep.sum()) == budget(len(ids), 0.2)
        kept = score[sel.keep]
        assert np.median(score) - 0.2 < kept.min() and kept.max() < np.median(score) + 0.2
        with pytest.raises(ValueError, match="registered already"):
            register("middle")(middle)
    finally:
        unregister("middle")
    assert "middle" not in list_strategies()


def _table(path, n: int = 1500) -> str:
    """A small score table of ``data()``'s rows (ties, a few unlabelled), in three parts."""
    import pyarrow as pa

    from dataprune import scoretable, tables

    ids, score, labels = data(n)
    d = pa.dictionary(pa.int32(), pa.string())
    for p, idx in enumerate(np.array_split(np.arange(n), 3)):
        m = len(idx)
        arrays = [pa.array(ids[idx]), pa.array(["s"] * m).dictionary_encode().cast(d), pa.array([str(i) for i in idx]),
                  pa.array(labels[idx], mask=labels[idx] < 0), pa.array(["/d/s"] * m).dictionary_encode().cast(d),
                  pa.array(idx.astype(np.int64)), pa.array(np.ones(m, np.int64)),
                  pa.array(["ok"] * m).dictionary_encode().cast(d), pa.nulls(m, pa.string()), pa.array(score[idx])]
        schema = pa.schema(list(tables.BASE_FIELDS) + [pa.field("el2n", pa.float32())])
        scoretable.write_part(str(path), p, pa.Table.from_arrays(arrays, schema=schema), {"rows": m})
    scoretable.write_table_meta(str(path), scoretable.score_table_meta({"format": "wds", "path": "/d", "options": {}},
                                                                       [f"c{i}" for i in range(7)], ["s"] * 3,
                                                                       {"el2n": {"params": {}}}))
    return str(path)


@pytest.mark.parametrize("name", list_strategies())
def test_out_of_core_gives_the_same_manifest(tmp_path, name):
    """Over the memory limit, a built-in strategy streams and a plug-in runs in memory with a warning:
    either way the manifest is the file the in-memory path writes."""
    import filecmp

    from dataprune.select import run_select

    t = _table(tmp_path / "t")
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    beta = {"ccs_beta": 0.1} if get_strategy(name).beta == "ccs_beta" else {"drop_hardest": 0.1}
    ra = run_select([t], config_for(name, frac=0.3, class_balanced=True, **beta), str(a))
    rb = run_select([t], config_for(name, frac=0.3, class_balanced=True, memory_limit=1, **beta), str(b))
    assert filecmp.cmp(a, b, shallow=False) and ra["summary"] == rb["summary"]
    assert rb["mode"] == "stream" or any("not built in" in w for w in rb["warnings"])
