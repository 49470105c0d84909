"""`dataprune curve` on tiny generated data: real selection, real training, real evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from dataprune.demo import make_demo
from dataprune.engine import ScoreConfig, score


def test_curve_two_fractions_two_strategies_through_the_cli(tmp_path):
    make_demo(str(tmp_path / "train"), n=160, shard_size=80, seed=1)
    make_demo(str(tmp_path / "test"), n=60, shard_size=60, seed=2)
    score(ScoreConfig(data=str(tmp_path / "train"), metrics=("el2n",), out=str(tmp_path / "scores"), model="test_resnet", epochs=1,
                      workers=0, batch_size=32))
    args = [sys.executable, "-m", "dataprune.cli", "curve", str(tmp_path / "train"), "--scores", str(tmp_path / "scores"),
            "--test", str(tmp_path / "test"), "--fracs", "1.0,0.5", "--keep", "hard,ccs", "--model", "test_resnet",
            "--epochs", "1", "--workers", "0", "--batch-size", "32", "--out", str(tmp_path / "curve"), "--json"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    t = pd.read_csv(tmp_path / "curve" / "curve.csv")
    assert len(t) == 4 and set(t["strategy"]) == {"hard", "ccs"} and set(t["fraction"]) == {1.0, 0.5}
    assert (t.loc[t["fraction"] == 1.0, "kept"] == 160).all() and (t.loc[t["fraction"] == 0.5, "kept"] == 80).all()
    assert (t.loc[t["fraction"] == 0.5, "epochs"] == 2).all()  # same number of steps as the full run
    full = t[t["fraction"] == 1.0]  # at 1.0 every strategy keeps everything: one training, one result
    assert full["test_error"].nunique() == 1 and full["train_seconds"].nunique() == 1
    assert t["test_samples"].eq(60).all() and t["test_error"].between(0, 1).all()
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 1000 and r["plot"].endswith("curve.png")
    assert pd.read_parquet(tmp_path / "curve" / "curve.parquet").shape[0] == 4
    # resumable per (strategy, fraction, repeat): a rerun trains nothing and gives the same table
    p2 = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0 and "curve: keep" not in p2.stderr
    pd.testing.assert_frame_equal(t, pd.read_csv(tmp_path / "curve" / "curve.csv"))
    # the CIFAR-10 example's report turns the same curve.csv into the RESULTS.md table
    rep = subprocess.run([sys.executable, "examples/cifar10/report.py", str(tmp_path)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert rep.returncode == 0, rep.stderr
    row = next(ln for ln in rep.stdout.splitlines() if ln.startswith("| 0.5 |"))
    want = t[t["fraction"] == 0.5].set_index("strategy")["test_error"] * 100
    assert row == f"| 0.5 | 80 | 2 | {want['hard']:.2f} | {want['ccs']:.2f} |"
    # other settings in the same --out are refused (they would mix two experiments in one curve) ...
    other = [a if a != "1" else "2" for a in args]  # --epochs 2
    p3 = subprocess.run(other, capture_output=True, text=True, timeout=300)
    assert p3.returncode == 2 and "other settings" in p3.stderr and "epochs 1 → 2" in p3.stderr and "Traceback" not in p3.stderr
    # ... unless --overwrite starts afresh
    i = other.index("--fracs")
    other[i + 1 : i + 4] = ["0.5", "--keep", "hard"]
    p4 = subprocess.run(other + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert p4.returncode == 0, p4.stderr
    t4 = pd.read_csv(tmp_path / "curve" / "curve.csv")
    assert len(t4) == 1 and t4["epochs"].tolist() == [4]


def test_curve_rejects_a_score_table_of_other_data(tmp_path):
    make_demo(str(tmp_path / "a"), n=40, shard_size=10, seed=1)
    make_demo(str(tmp_path / "b"), n=20, shard_size=20, seed=2)
    score(ScoreConfig(data=str(tmp_path / "a"), metrics=("el2n",), out=str(tmp_path / "scores"), model="test_resnet", epochs=1,
                      workers=0))
    p = subprocess.run([sys.executable, "-m", "dataprune.cli", "curve", str(tmp_path / "b"), "--scores", str(tmp_path / "scores"),
                        "--test", str(tmp_path / "b"), "--fracs", "0.5", "--keep", "hard", "--model", "test_resnet", "--epochs", "1",
                        "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert p.returncode == 2 and "was not made from" in p.stderr and "Traceback" not in p.stderr
