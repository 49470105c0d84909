"""Out-of-core `select` (select/stream.py, select/radix.py): the same manifest file as in memory, for
every strategy and tie case, forced with a tiny --memory-limit."""

from __future__ import annotations

import filecmp
import glob
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from dataprune import scoretable, tables
from dataprune.ids import mix64
from dataprune.select import SelectConfig, order_key, run_select
from dataprune.select.radix import RankSearch, above

SOURCE = {"format": "wds", "path": "/nowhere", "options": {}}


def make_table(path, n=2400, parts=4, seed=0, ties=False, float64=False, labels="mixed", const=False, extremes=False) -> str:
    """A score table with the awkward cases: few distinct scores (ties at every cut), a class with one
    row, classes with none (labels jump), unlabelled rows, rows that failed, NaN scores, duplicates."""
    rng = np.random.default_rng(seed)
    score = rng.random(n)
    if ties:
        score = np.round(score * 3) / 3  # four distinct values
    if const:
        score[:] = 0.5
    if extremes:  # signed zeros and infinities
        score[::7], score[3::11], score[5::13], score[6::13] = np.inf, -np.inf, 0.0, -0.0
    score = score.astype(np.float64 if float64 else np.float32)
    label = rng.choice([0, 1, 2, 4, 9], n).astype(np.int32)  # 3, 5-8: empty classes
    label[5] = 7  # one row
    lab = pa.array(label)
    if labels == "mixed":
        lab = pa.array(label, mask=np.arange(n) % 97 == 3)  # some unlabelled
    elif labels == "odd":  # labels that only rows out of the candidates have: a failed row's 50, a NaN row's null
        label[1], label[2] = 50, 0
        lab = pa.array(label, mask=np.arange(n) == 2)
    elif labels == "none":
        lab = pa.nulls(n, pa.int32())
    status = np.where(np.arange(n) % 211 == 1, "decode_error", "ok")
    score[np.arange(n) % 331 == 2] = np.nan
    dup = np.arange(n) % 13 == 0
    ids = mix64(np.arange(n, dtype=np.uint64), 42 + seed)
    os.makedirs(path, exist_ok=True)
    d = pa.dictionary(pa.int32(), pa.string())
    stype = pa.float64() if float64 else pa.float32()
    for p, idx in enumerate(np.array_split(np.arange(n), parts)):
        shard = f"shard-{p}"
        arrays = [pa.array(ids[idx], pa.uint64()), pa.array([shard] * len(idx)).dictionary_encode().cast(d),
                  pa.array([f"{i:06d}" for i in idx]), lab.take(pa.array(idx)),
                  pa.array(["/data/" + shard] * len(idx)).dictionary_encode().cast(d),
                  pa.array(idx.astype(np.int64) * 512), pa.array(np.full(len(idx), 512, np.int64)),
                  pa.array(status[idx].tolist()).dictionary_encode().cast(d), pa.nulls(len(idx), pa.string()),
                  pa.array(score[idx], stype), pa.array(dup[idx])]
        schema = pa.schema(list(tables.BASE_FIELDS) + [pa.field("el2n", stype), pa.field("is_duplicate", pa.bool_())])
        scoretable.write_part(str(path), p, pa.Table.from_arrays(arrays, schema=schema), {"rows": len(idx)})
    meta = scoretable.score_table_meta(SOURCE, [f"c{i}" for i in range(10)], [f"shard-{p}" for p in range(parts)],
                                       {"el2n": {"params": {}}})
    scoretable.write_table_meta(str(path), meta)
    return str(path)


CASES = [
    dict(),
    dict(keep="easy", frac=0.3),
    dict(keep="random", frac=0.4, seed=5),
    dict(class_balanced=True),
    dict(class_balanced=True, class_quota="equal", keep="easy"),
    dict(drop_hardest=0.1),
    dict(drop_hardest=0.2, keep="easy", class_balanced=True),
    dict(drop_hardest=0.1, keep="random", class_balanced=True),
    dict(strategy="ccs", frac=0.4, ccs_strata=6),
    dict(strategy="ccs", frac=0.3, ccs_beta=0.1, class_balanced=True, ccs_strata=4),
    dict(dedup=True, seed=3),
    dict(dedup=True, class_balanced=True, min_score=0.2, max_score=0.9),
    dict(count=7, class_balanced=True),
    dict(count=1),
    dict(frac=0.5, drop_hardest=0.5),
]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "hard" for c in CASES])
def test_streamed_manifest_is_the_in_memory_one(tmp_path, case, ties, same):
    t = make_table(tmp_path / "t", ties=ties)
    same(t, tmp_path, **case)


@pytest.mark.parametrize("limit", [1, 50_000, 200_000], ids=["bins-of-2", "small", "medium"])
def test_every_histogram_width_gives_the_same_cut(tmp_path, limit, same):
    """From two-bin histograms (many passes over key and hash bits) to wider ones that collect sooner."""
    t = make_table(tmp_path / "t", n=3000, ties=True)
    _, rb = same(t, tmp_path, limit=limit, class_balanced=True, drop_hardest=0.05)
    assert rb["passes"] >= 4


def test_float64_scores_unlabelled_rows_and_no_labels(tmp_path, same):
    t = make_table(tmp_path / "t64", float64=True, ties=True)
    same(t, tmp_path, class_balanced=True, drop_hardest=0.1)
    same(t, tmp_path, strategy="ccs", ccs_strata=5)
    u = make_table(tmp_path / "u", labels="none")
    ra, _ = same(u, tmp_path, keep="random")
    assert "per_class" not in ra["summary"]


@pytest.mark.parametrize("first,second", [(pa.float64(), pa.float32()), (pa.float32(), pa.float64()), (pa.float32(), pa.int32())])
def test_parts_whose_score_types_differ(tmp_path, first, second, same):
    """Parts from different runs or tools: each part's scores are read in the first part's type, as in memory."""
    t = make_table(tmp_path / "t", float64=first == pa.float64())
    part = sorted(glob.glob(os.path.join(t, "parts", "*.parquet")))[1]
    tab = pq.read_table(part)
    tab = tab.set_column(tab.column_names.index("el2n"), "el2n", pc.cast(pc.multiply(tab.column("el2n"), 10 if second == pa.int32() else 1),
                                                                    second, safe=False))
    scoretable.write_part(t, 1, tab, {"rows": tab.num_rows})  # the part and its done-marker
    same(t, tmp_path)
    same(t, tmp_path, class_balanced=True, drop_hardest=0.1)


def test_a_part_without_the_metric_column_is_a_table_error_naming_it(tmp_path):
    from dataprune.errors import TableError

    t = make_table(tmp_path / "t")
    part = sorted(glob.glob(os.path.join(t, "parts", "*.parquet")))[2]
    scoretable.write_part(t, 2, pq.read_table(part).drop_columns(["el2n"]), {"rows": 600})
    for limit in (None, 1):
        with pytest.raises(TableError, match=r"part-000002\.parquet.*'el2n'"):
            run_select([t], SelectConfig(frac=0.5, nan="drop", memory_limit=limit), str(tmp_path / "m.parquet"))


def test_labels_outside_the_candidates(tmp_path, same):
    t = make_table(tmp_path / "t", labels="odd", ties=True)
    for kw in (dict(class_balanced=True, drop_hardest=0.1), dict(class_balanced=True, keep="random", drop_hardest=0.1),
               dict(strategy="ccs", class_balanced=True, ccs_strata=4, ccs_beta=0.05)):
        ra, _ = same(t, tmp_path, **kw)
        assert 50 not in ra["summary"]["per_class"]["label"] and None not in ra["summary"]["per_class"]["label"]


def test_all_scores_equal_is_decided_by_the_hash(tmp_path, same):
    t = make_table(tmp_path / "t", n=1500, const=True)
    same(t, tmp_path, class_balanced=True)
    same(t, tmp_path, keep="easy", drop_hardest=0.3)
    same(t, tmp_path, strategy="ccs", ccs_strata=3)


def test_signed_zeros_and_infinities(tmp_path, same):
    """-0.0 == 0.0 as a score: the manifests (their recorded score ranges included) are the same bytes."""
    t = make_table(tmp_path / "t", extremes=True, parts=2)
    for kw in (dict(min_score=0.0, max_score=0.5), dict(min_score=0.0, class_balanced=True), dict(keep="easy", drop_hardest=0.2),
               dict(max_score=0.0, keep="easy", class_balanced=True)):
        same(t, tmp_path, **kw)


def test_ccs_over_infinite_scores_is_a_clear_error_on_both_paths(tmp_path, same):
    """Equal-width strata of an infinite range do not exist: one ConfigError, not a numpy traceback."""
    from dataprune.errors import ConfigError

    t = make_table(tmp_path / "t", extremes=True)
    for limit in (None, 1):
        with pytest.raises(ConfigError, match="finite"):
            run_select([t], SelectConfig(strategy="ccs", frac=0.5, nan="drop", memory_limit=limit), str(tmp_path / "m.parquet"))
        assert not (tmp_path / "m.parquet").exists()
    same(t, tmp_path, strategy="ccs", frac=0.5, min_score=-1e30, max_score=1e30, ccs_strata=4)  # the way out it names


def test_errors_match_the_in_memory_path(tmp_path):
    t = make_table(tmp_path / "t")
    for kw in (dict(nan="error", frac=0.5), dict(count=10**6, nan="drop"), dict(min_score=2.0, frac=0.5, nan="drop")):
        msgs = []
        for limit in (None, 1):
            with pytest.raises(Exception) as e:
                run_select([t], SelectConfig(**kw, memory_limit=limit), str(tmp_path / "m.parquet"))
            msgs.append((type(e.value), str(e.value)))
        assert msgs[0] == msgs[1]
    assert not (tmp_path / "m.parquet").exists()


def test_what_cannot_stream_runs_in_memory_with_a_warning(tmp_path):
    t = make_table(tmp_path / "t")
    import pyarrow.parquet as pq

    ids = pq.read_table(os.path.join(t, "parts"), columns=["sample_id"]).column(0).to_pylist()
    other = tmp_path / "f.csv"
    other.write_text("sample_id,x\n" + "".join(f"{i},{j % 7}\n" for j, i in enumerate(ids)))
    r = run_select([t, str(other)], SelectConfig(by=("el2n",), frac=0.5, nan="drop", memory_limit=1), None, dry_run=True)
    assert r["mode"] == "memory"
    assert any("joining several inputs" in w for w in r["warnings"])


def test_dry_run_streams_too(tmp_path):
    t = make_table(tmp_path / "t")
    a = run_select([t], SelectConfig(frac=0.5, nan="drop", class_balanced=True), None, dry_run=True)
    b = run_select([t], SelectConfig(frac=0.5, nan="drop", class_balanced=True, memory_limit=1), None, dry_run=True)
    assert b["mode"] == "stream" and a["summary"] == b["summary"]


def test_cli_forced_out_of_core(tmp_path):
    t = make_table(tmp_path / "t", ties=True)
    outs = []
    for extra in ([], ["--memory-limit", "1kB"]):
        out = tmp_path / f"m{len(extra)}.parquet"
        p = subprocess.run([sys.executable, "-m", "dataprune", "select", t, "--frac", "0.4", "--class-balanced", "--nan", "drop",
                            "--drop-hardest", "0.1", "--out", str(out)] + extra, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        outs.append((out, p.stdout))
    assert filecmp.cmp(outs[0][0], outs[1][0], shallow=False)
    assert "out of core" in outs[1][1] and "out of core" not in outs[0][1]
    p = subprocess.run([sys.executable, "-m", "dataprune", "select", t, "--frac", "0.4", "--memory-limit", "lots",
                        "--out", str(tmp_path / "x.parquet")], capture_output=True, text=True)
    assert p.returncode == 2 and "--memory-limit takes a size" in p.stderr and "Traceback" not in p.stderr


# ------------------------------------------------------------------------------- RankSearch itself

@pytest.mark.parametrize("entries,collect", [(16, 16), (1 << 12, 1 << 12)])
def test_rank_search_finds_the_exact_row(entries, collect):
    rng = np.random.default_rng(3)
    n, groups = 5000, 7
    key = order_key(np.round(rng.random(n) * 5).astype(np.float32))
    ids = mix64(np.arange(n, dtype=np.uint64), 1)
    ids[100:110] = ids[99]  # equal ids: only the row number orders them
    codes = rng.integers(0, groups, n).astype(np.intp)
    mask = rng.random(n) < 0.9
    sizes = np.bincount(codes[mask], minlength=groups)
    grp = np.repeat(np.arange(groups), 2)
    rank = np.stack([np.zeros(groups, int), sizes - 1], 1).reshape(-1)
    rank[::2] = sizes // 3
    rs = RankSearch(grp, rank, sizes[grp], groups, 32, 9, hist_entries=entries, collect_rows=collect)
    while rs.active:
        rs.begin()
        for a in range(0, n, 700):  # batches
            b = min(n, a + 700)
            rs.feed(codes[a:b], key[a:b], ids[a:b], a, mask[a:b])
        rs.end()
    h = mix64(ids, 9)
    for t in range(len(grp)):
        rows = np.flatnonzero(mask & (codes == grp[t]))
        order = rows[np.lexsort((rows, h[rows], key[rows]))]
        want = order[rank[t]]
        assert (rs.rk[t], rs.rh[t], rs.ri[t]) == (key[want], h[want], want)
        gt, eq = above(key, ids, np.arange(n), np.full(n, rs.rk[t]), np.full(n, rs.rh[t]), np.full(n, rs.ri[t]), 9)
        assert eq.sum() == 1 and eq[want]
        pos = np.empty(n, int)
        pos[order] = np.arange(len(order))
        assert (gt[order] == (pos[order] > rank[t])).all()


def test_a_plug_in_strategy_runs_in_memory_with_a_warning(tmp_path):
    from dataprune.select import Pool, register, top_k_per_group, unregister

    @register("toy-middle")
    def middle(p: Pool):
        dist = np.abs(p.score.astype(np.float64) - np.median(p.score))
        return top_k_per_group(order_key(-dist), p.quotas, p.ids, p.cfg.seed, codes=p.codes), None

    try:
        t = make_table(tmp_path / "t")
        r = run_select([t], SelectConfig(keep="toy-middle", frac=0.5, nan="drop", memory_limit=1), None, dry_run=True)
        assert r["mode"] == "memory" and any("'toy-middle' is not built in" in w for w in r["warnings"])
    finally:
        unregister("toy-middle")


# ------------------------------------------------------------------- fused passes (counting + tally)

@pytest.mark.parametrize("bits", [32, 64])
def test_first_histogram_narrows_every_target_to_the_bin_of_its_rank(bits):
    """The counting pass's histogram: bins spanning the first batch's keys, open at both ends (later
    batches reach far outside), one row per label slot grown as labels appear; each target's bin
    holds its rank, and the rank and population it hands on are counted within that bin."""
    from dataprune.select.radix import FirstHist

    rng = np.random.default_rng(bits)
    n = 20_000
    score = np.round(rng.random(n) * 40).astype(np.float32 if bits == 32 else np.float64)  # ties everywhere
    score[5000:5100] = -1e30  # far below the first batch's range, then far above it
    score[9000:9050] = 1e30
    key = order_key(score)
    lab = rng.integers(-1, 6, n).astype(np.int32)
    lab[15000:] = rng.integers(-1, 24, n - 15000)  # labels beyond the slots it was sized for (up to 2× the entries)
    fh = FirstHist(slots=20, entries=1000, key_bits=bits, per_label=True)
    for a in range(0, n, 999):
        fh.add(lab[a:a + 999], key[a:a + 999])
    assert fh.ok and fh.slots == 25
    for slots in ([0], [3], [1, 2, 23], list(range(25))):
        keys = np.sort(key[np.isin(lab + 1, slots)]).astype(np.uint64)
        for rank in (0, len(keys) // 3, len(keys) - 1):
            r, pop, lo, hi = fh.narrow([np.array(slots)], np.array([rank]))
            assert lo[0] <= keys[rank] <= hi[0]
            assert r[0] == rank - np.count_nonzero(keys < lo[0])
            assert pop[0] == np.count_nonzero((keys >= lo[0]) & (keys <= hi[0])) and 0 <= r[0] < pop[0]
    big = FirstHist(slots=3, entries=64, key_bits=bits, per_label=True)
    big.add(np.array([1, 1 << 24], dtype=np.int64), key[:2])
    assert not big.ok  # labels it cannot count densely: the search starts from the whole range instead
    assert not FirstHist(slots=10**6, entries=1000, key_bits=bits, per_label=True).ok  # more classes than it may count


def test_kept_bits_across_parts_of_any_length():
    from dataprune.select.tally import KeptBits

    rng = np.random.default_rng(1)
    sizes = [13, 1, 8, 0, 100, 37]
    keep = [rng.random(s) < 0.5 for s in sizes]
    kb = KeptBits()
    for k in keep:
        kb.add(k)
    late = np.flatnonzero(~np.concatenate(keep))[::3]
    kb.set(late[::-1])
    want = np.concatenate(keep)
    want[late] = True
    got = np.concatenate([kb.part(i, s) for i, s in enumerate(sizes)])
    assert (got == want).all()
    assert kb.part(1, 2) is None and kb.part(len(sizes), 0) is None  # a part of another length, or one too many


FUSED = [
    (dict(class_balanced=True, frac=0.8), 3),
    (dict(keep="easy", drop_hardest=0.1), 3),
    (dict(keep="easy", class_balanced=True, class_quota="equal", frac=0.3), 3),
    (dict(keep="random", class_balanced=True, drop_hardest=0.05), 6),  # + the random key's own histogram passes
    (dict(keep="random", frac=0.4), 4),
    (dict(strategy="ccs", frac=0.4, ccs_strata=5, class_balanced=True), 6),  # + the strata's range and sizes
]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("kw,passes", FUSED, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in FUSED])
def test_fused_passes_write_the_in_memory_manifest(tmp_path, kw, passes, ties, same):
    """At a memory limit where the counting pass's histogram leaves few rows per cut, the decision
    takes one search pass that also tallies and records the kept rows: counting, that pass, then the
    write (random and CCS add their own passes). Ties need more passes over the hash; parts of uneven
    odd lengths put cuts, ties and the kept bits across part boundaries."""
    t = make_table(tmp_path / "t", n=6007, parts=13, ties=ties, seed=4)
    _, rb = same(t, tmp_path, limit=150_000, **kw)
    assert rb["passes"] == passes if not ties else rb["passes"] >= passes


def test_a_part_that_changes_before_the_write_pass_is_a_table_error(tmp_path):
    """The write pass reads only the manifest's columns and takes the kept rows from the tally's bits;
    a part rewritten in between (other rows) is caught, not written with the wrong rows."""
    from dataprune.errors import TableError
    from dataprune.select.gather import arrange_inputs
    from dataprune.select.stream import Stream

    t = make_table(tmp_path / "t", n=3000, parts=3)
    cfg = SelectConfig(frac=0.5, nan="drop", class_balanced=True)
    st = Stream(cfg, arrange_inputs([t])[0], ["el2n"], 150_000)
    st.count()
    st.decide()
    st.tally()
    assert st.bits is not None and st.passes == 2
    part = sorted(glob.glob(os.path.join(t, "parts", "*.parquet")))[1]
    tab = pq.read_table(part)
    scoretable.write_part(t, 1, tab.slice(0, tab.num_rows - 1), {"rows": tab.num_rows - 1})
    with pytest.raises(TableError, match="changed while it was being read"):
        list(st.pieces())
