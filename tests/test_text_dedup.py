"""text-dedup (exact + MinHash LSH) and text-substr (suffix array) on generated corpora with planted
copies, through the engine, the CLI chain score → select → export, and torchrun."""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from dataprune.engine import ScoreConfig, score
from dataprune.errors import ConfigError
from dataprune.metrics import get_metric, list_metrics
from dataprune.metrics.minhash import normalise, optimal_bands, permutations, shingle_hashes, signatures
from dataprune.metrics.textdedup import bucket_pairs

NGRAM = 5


def shingles(text: str) -> set:
    w = normalise(text).split(" ")
    return {" ".join(w[i: i + NGRAM]) for i in range(max(1, len(w) - NGRAM + 1))}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def edit(words: list, k: int, rng) -> list:
    w = list(words)
    for i in rng.sample(range(len(w)), k):
        w[i] = f"edit{rng.randrange(10**9)}"
    return w


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """150 documents of 300 words; 20 exact copies (case and spacing changed), 100 near copies (1–4
    words replaced, Jaccard ≥ 0.85), 60 far pairs (16–40 words replaced, Jaccard ≤ 0.6)."""
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(20000)]
    base = [[rng.choice(vocab) for _ in range(300)] for _ in range(150)]
    docs = [(f"b{i}", " ".join(w)) for i, w in enumerate(base)]
    exact = [(f"x{i}", "  " + " ".join(base[i]).upper().replace(" ", " \n ")) for i in range(20)]
    near = [(f"n{i}", " ".join(edit(base[20 + i], 1 + i % 4, rng))) for i in range(100)]
    far = [(f"f{i}", " ".join(edit(base[120 + i % 30], 16 + i % 25, rng))) for i in range(60)]
    rows = docs + exact + near + far
    rng.shuffle(rows)
    d = tmp_path_factory.mktemp("planted") / "corpus"
    d.mkdir()
    for j in range(3):
        with open(d / f"part-{j}.jsonl", "w") as f:
            for key, text in rows[j::3]:
                f.write(json.dumps({"id": key, "text": text}) + "\n")
    truth = {"exact": [(f"x{i}", f"b{i}") for i in range(20)], "near": [(f"n{i}", f"b{20 + i}") for i in range(100)],
             "far": [(f"f{i}", f"b{120 + i % 30}") for i in range(60)]}
    return d, dict(rows), truth


def _table(out) -> pd.DataFrame:
    return pd.read_parquet(out / "parts").sort_values(["shard", "key"]).reset_index(drop=True)


def test_exact_and_near_copies_are_found_and_far_pairs_are_not(planted, tmp_path):
    d, text, truth = planted
    r = score(ScoreConfig(data=str(d), metrics=("text-dedup",), out=str(tmp_path / "s"), workers=0))
    assert r["scored"] == len(text) and r["skipped"] == 0
    t = _table(tmp_path / "s").set_index("key")
    group = t["dup_group"]
    same = lambda a, b: group[a] >= 0 and group[a] == group[b]  # noqa: E731
    assert all(same(a, b) for a, b in truth["exact"]), "every planted exact copy is found"
    assert (t.loc[[a for a, _ in truth["exact"]], "dup_max_sim"] == 1).all()
    near = [(a, b) for a, b in truth["near"] if jaccard(text[a], text[b]) >= 0.85]
    assert len(near) == 100
    recall = np.mean([same(a, b) for a, b in near])
    far = [(a, b) for a, b in truth["far"] if jaccard(text[a], text[b]) <= 0.6]
    assert len(far) >= 40
    flagged_far = np.mean([same(a, b) for a, b in far])
    # precision: every pair inside a found group is a true copy (estimated ≥ 0.8 verified; true Jaccard ≥ 0.8)
    pairs = [(a, b) for g, keys in t[t.dup_group >= 0].groupby("dup_group").groups.items() for a in keys for b in keys if a < b]
    precision = np.mean([jaccard(text[a], text[b]) >= 0.8 for a, b in pairs])
    assert recall >= 0.95 and precision >= 0.95 and flagged_far <= 0.02, (recall, precision, flagged_far)
    # one keeper per group (first in corpus order by default), the rest flagged
    dup = t[t.dup_group >= 0]
    assert (dup.groupby("dup_group")["is_duplicate"].apply(lambda s: (~s).sum()) == 1).all()
    assert not t.loc[t.dup_group < 0, "is_duplicate"].any() and t.loc[t.dup_group < 0, "dup_group"].eq(-1).all()
    bands, rows = optimal_bands(0.8, 256)
    meta = json.loads((tmp_path / "s" / "_dataprune.json").read_text())
    assert meta["metrics"]["text-dedup"]["params"]["bands"] == bands and meta["metrics"]["text-dedup"]["params"]["rows"] == rows


def test_keep_longest_and_random_pick_their_keeper(planted, tmp_path):
    d, text, truth = planted
    for keep in ("longest", "random"):
        score(ScoreConfig(data=str(d), metrics=("text-dedup",), out=str(tmp_path / keep), workers=0, dedup_keep=keep))
    t = _table(tmp_path / "longest")
    t["len"] = t["key"].map(lambda k: len(text[k].encode()))
    for _, g in t[t.dup_group >= 0].groupby("dup_group"):
        assert g.loc[~g.is_duplicate, "len"].iloc[0] == g["len"].max()
    assert (_table(tmp_path / "random")["dup_group"] == t["dup_group"]).all()
    with pytest.raises(ConfigError, match="text-dedup keeps"):
        score(ScoreConfig(data=str(d), metrics=("text-dedup",), out=str(tmp_path / "bad"), dedup_keep="hard"))
    with pytest.raises(ConfigError, match="cannot run with text metrics"):
        score(ScoreConfig(data=str(d), metrics=("text-dedup", "el2n"), out=str(tmp_path / "bad")))
    with pytest.raises(ConfigError, match="text corpus"):
        score(ScoreConfig(data=str(d), metrics=("el2n",), out=str(tmp_path / "bad")))


def test_minhash_estimates_jaccard_and_the_bands_follow_datasketch():
    rng = random.Random(1)
    words = [f"v{rng.randrange(10**6)}" for _ in range(400)]
    other = edit(words, 12, rng)
    a, b = permutations(1024)
    s = signatures([shingle_hashes(normalise(" ".join(x)), NGRAM) for x in (words, other)], a, b)
    est, true = float((s[0] == s[1]).mean()), jaccard(" ".join(words), " ".join(other))
    assert abs(est - true) < 0.05, (est, true)
    assert optimal_bands(0.8, 128, 0.5) == (9, 13) and optimal_bands(0.8, 256, 0.5) == (17, 15)  # datasketch's _optimal_param
    keys = np.array([5, 1, 5, 5, 2, 1], np.uint64)
    x, y = bucket_pairs(keys, np.arange(6))
    assert sorted(zip(x.tolist(), y.tolist())) == [(0, 2), (0, 3), (1, 5), (2, 3)]


def test_shared_passages_give_their_share_of_bytes(tmp_path):
    rng = random.Random(3)
    tok = lambda n: [f"t{rng.randrange(10**7)}" for _ in range(n)]  # noqa: E731
    passage = tok(300)
    docs = {}
    for i in range(3):  # the same 300-token passage inside three documents of 1000 tokens
        body = tok(700)
        cut = rng.randrange(700)
        docs[f"s{i}"] = " ".join(body[:cut] + passage + body[cut:])
    docs["twice"] = " ".join(tok(200) + passage[:100] + tok(300) + passage[:100])  # repeated inside one document
    docs["short"] = " ".join(tok(100) + passage[:40] + tok(100))  # a repeat shorter than --min-span
    for i in range(20):
        docs[f"u{i}"] = " ".join(tok(500))
    d = tmp_path / "c"
    d.mkdir()
    (d / "c.jsonl").write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    score(ScoreConfig(data=str(d), metrics=("text-substr",), out=str(tmp_path / "s"), workers=0))
    t = _table(tmp_path / "s").set_index("key")["dup_span_frac"]
    for i in range(3):
        share = len(" ".join(passage)) / len(docs[f"s{i}"])
        assert abs(t[f"s{i}"] - share) < 0.005, (t[f"s{i}"], share)
    assert abs(t["twice"] - 2 * len(" ".join(passage[:100])) / len(docs["twice"])) < 0.005
    assert t["short"] == 0 and (t[[f"u{i}" for i in range(20)]] == 0).all()


def run_cli(*args, env=None):
    r = subprocess.run([sys.executable, "-m", "dataprune", *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_cli_chain_score_select_dedup_export_jsonl(planted, tmp_path):
    d, text, _ = planted
    run_cli("score", d, "--metric", "text-dedup,text-substr", "--out", tmp_path / "s", "--num-perm", "128")
    run_cli("select", tmp_path / "s", "--dedup", "--frac", "1", "--out", tmp_path / "m.parquet")
    run_cli("export", tmp_path / "m.parquet", "--to", "jsonl", "--out", tmp_path / "e")
    t = _table(tmp_path / "s")
    kept = set(t.loc[~t.is_duplicate, "key"])
    lines = [ln for f in sorted(glob.glob(str(tmp_path / "e" / "*.jsonl"))) for ln in open(f, "rb").read().split(b"\n") if ln]
    originals = {ln for f in glob.glob(str(d / "*.jsonl")) for ln in open(f, "rb").read().split(b"\n") if ln}
    assert {json.loads(ln)["id"] for ln in lines} == kept and set(lines) <= originals  # the kept lines, byte for byte
    assert not os.path.exists(tmp_path / "s" / ".text"), "the text pass's arrays go once the table is complete"


def test_the_next_step_score_prints_for_a_text_dedup_table_runs(tmp_path):
    """A text-dedup table has no score column: the select command score suggests must still work."""
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.jsonl").write_text("".join(json.dumps({"id": i, "text": "same words here" if i < 3 else f"doc {i}"}) + "\n"
                                       for i in range(6)))
    r = run_cli("score", d, "--metric", "text-dedup", "--workers", "0", "--out", tmp_path / "s")
    nxt = r.stdout.strip().splitlines()[-1].split("next: ")[1].split()
    assert nxt[:2] == ["dataprune", "select"] and "--dedup" in nxt
    run_cli(*nxt[1:], "--out", tmp_path / "m.parquet")
    assert sorted(pd.read_parquet(tmp_path / "m.parquet")["key"]) == ["0", "3", "4", "5"]


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
            out.append(int(d))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the worker process")
def test_a_killed_worker_stops_the_run_with_one_line_not_a_hang(tmp_path):
    """A text worker killed from outside (the OOM killer) must not leave the pool waiting forever."""
    import signal
    import time

    rng = random.Random(5)
    d = tmp_path / "c"
    d.mkdir()
    for j in range(12):
        (d / f"p{j:02d}.jsonl").write_text("".join(json.dumps({"id": i, "text": " ".join(f"w{rng.randrange(9999)}" for _ in range(200))})
                                                   + "\n" for i in range(400)))
    p = subprocess.Popen([sys.executable, "-m", "dataprune", "score", str(d), "--metric", "text-dedup", "--workers", "1",
                          "--out", str(tmp_path / "s")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not glob.glob(str(tmp_path / "s" / ".text" / "*" / "base-*.parquet")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)  # the worker is through its first shard, into the next
    for c in _children(p.pid):
        os.kill(c, signal.SIGKILL)
    try:
        _, err = p.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("score hangs after its worker was killed")
    assert p.returncode != 0 and "Traceback" not in err and "worker" in err, err[-2000:]
    run_cli("score", d, "--metric", "text-dedup", "--workers", "1", "--out", tmp_path / "s")  # and a rerun completes


def test_torchrun_two_gloo_ranks_give_the_same_table_as_one_process(planted, tmp_path):
    d, _, _ = planted
    args = ["score", str(d), "--metric", "text-dedup,text-substr", "--workers", "0", "--num-perm", "64"]
    run_cli(*args, "--out", tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531", "-m",
                        "dataprune.cli", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = _table(tmp_path / "one"), _table(tmp_path / "two")
    assert len(one) == 330 and one["is_duplicate"].sum() > 100
    pd.testing.assert_frame_equal(one, two)


@pytest.mark.parametrize("name", [n for n in list_metrics() if get_metric(n).kind == "text"])
def test_every_text_metric_scores_every_document_within_its_range(planted, tmp_path, name):
    """The metric contract (tests/test_metrics_contract.py) for the ``text`` kind, on a text corpus."""
    d, text, _ = planted
    r = score(ScoreConfig(data=str(d), metrics=(name,), out=str(tmp_path / "s"), workers=0, num_perm=32))
    m, t = get_metric(name), _table(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "_dataprune.json").read_text())
    assert r["scored"] == len(text) == len(t)
    for col in m.score_columns:
        v = t[col].to_numpy()
        assert t[col].dtype == np.float32 and np.isfinite(v).all() and v.min() >= m.low and v.max() <= m.high
        assert meta["metrics"][col]["direction"] == "higher = harder" and meta["metrics"][col]["metric"] == name
    for col in m.extra_columns:
        assert col in t.columns
    assert meta["modality"] == "text"


def test_an_interrupted_run_resumes_from_the_saved_arrays(planted, tmp_path):
    """With the text pass's arrays kept (--keep-artifacts), a part lost after the run is written again from
    them — the same table, and only the missing part is written."""
    d, text, _ = planted
    cfg = ScoreConfig(data=str(d), metrics=("text-dedup", "text-substr"), out=str(tmp_path / "s"), workers=0, num_perm=64,
                      keep_artifacts=True)
    r = score(cfg)
    assert any(a["kind"] == "text arrays" for a in r["artifacts"])
    want = _table(tmp_path / "s")
    os.unlink(tmp_path / "s" / "parts" / "part-000001.parquet")
    os.unlink(tmp_path / "s" / "_done" / "part-000001.json")
    again = score(cfg)
    assert again["shards_done_before"] == 2 and again["seen"] == len(text) // 3
    pd.testing.assert_frame_equal(_table(tmp_path / "s"), want)
    assert score(cfg)["seen"] == 0  # complete: nothing read, no model, nothing written
