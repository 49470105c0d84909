"""Progress of `dataprune score`: one overall fraction and ETA over the whole job, per-phase rates over
each phase's own time, timestamped lines off a terminal and a rich display on one."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest

from dataprune.demo import make_demo
from dataprune.progress.job import Job
from dataprune.progress.reporter import Lines, every_s, make_report, status
from dataprune.progress.rows import Rows, estimate_rows
from dataprune.progress.work import TRAIN_COST, Work, fmt_secs

CLI = [sys.executable, "-m", "dataprune.cli"]
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
LINE = re.compile(rf"^({STAMP}) \[ *(\d+|\?)%\] ETA (\S+) · (.*)$")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def plan_event(rows=(100, 100), runs=1, epochs=2, embed=False):
    idx = list(range(len(rows)))
    work = {"rows": {"rows": dict(zip(idx, map(float, rows))), "bytes": dict.fromkeys(idx), "exact": idx}, "mine": idx,
            "todo": idx, "train": {"runs": runs, "epochs": epochs} if epochs else None, "embed": embed,
            "kmeans": {"iters": 10, "sample": None} if embed else None, "score_cost": 1.0}
    return {"shards": len(rows), "todo": len(rows), "done": 0, "image_size": 32, "device": "cpu", "metrics": ["el2n"],
            "rank": 0, "world": 1, "work": work}


def test_eta_is_remaining_work_at_each_phase_measured_or_prior_speed():
    w, now = Work(), 0.0
    w.add("train", 600, TRAIN_COST)
    w.add("score", 100, 1.0)
    w.advance("train", 300, now)
    now = 3.0  # 300 training samples in 3 s: 100/s
    assert w.phases["train"].rate(now) == pytest.approx(100)
    # train: 300 left at its own 0.01 s/sample; score (not run yet): 100 samples × 1 equiv × 3 s / (300 × 3 equiv)
    assert w.eta(now) == pytest.approx(3.0 + 100 / 300)
    assert w.fraction() == pytest.approx(300 * 3 / (600 * 3 + 100))
    w.advance("train", 300, now)
    w.finish("train", now)
    w.advance("score", 50, now)
    now += 1.0  # score measured on its own time: 50 in 1 s = 50/s, however long training took
    assert w.phases["score"].rate(now) == pytest.approx(50)
    assert w.eta(now) == pytest.approx(50 / 50)
    w.advance("score", 50, now)
    w.finish("score", now)
    assert w.fraction() == 1.0 and w.eta(now) == 0.0


def test_resumed_epochs_count_as_done_but_not_as_speed():
    clock, job = Clock(), Job()
    job.on("plan", plan_event(rows=(100,), epochs=4), clock())
    job.on("resume", {"run": 0, "epoch": 2}, clock())
    job.on("train_start", {"run": 0, "epoch": 2, "epochs": 4, "samples": None}, clock())
    train = job.work.phases["train"]
    assert train.total == 400 and train.done == 200 and train.skipped == 200
    job.on("train_step", {"run": 0, "epoch": 2, "epochs": 4, "samples": 50}, clock())
    clock.t += 5.0
    assert train.rate(clock()) == pytest.approx(10.0)  # 50 in 5 s, not 250 in 5 s
    assert "epoch 3/4" in train.label


def run_synthetic(job: Job, clock: Clock, report, train_s=10.0, score_s=2.0):
    """2 shards × 100 rows: 2 epochs of training taking ``train_s`` each, then scoring taking ``score_s``."""
    report("plan", plan_event())
    report("train_start", {"run": 0, "epoch": 0, "epochs": 2, "samples": None})
    for ep in range(2):
        for _ in range(4):
            clock.t += train_s / 4
            report("train_step", {"run": 0, "epoch": ep, "epochs": 2, "samples": 50})
        report("train_epoch", {"run": 0, "epoch": ep + 1, "epochs": 2, "loss": 1.0, "acc": 0.5, "samples": 200,
                               "rank_samples": 200, "seconds": train_s})
    report("score_start", {"shards": 2})
    for i in range(2):
        clock.t += score_s / 2
        report("score_batch", {"samples": 100})
        report("shard", {"index": i, "seen": 100, "scored": 100, "skipped": 0, "timings": {}, "elapsed": 0.0})


def test_a_whole_job_reaches_100_percent_with_rates_over_each_phases_own_time():
    clock, out = Clock(), io.StringIO()
    report = make_report(Lines(0.0, out, wall=lambda: 0.0), clock=clock)
    job = report.job
    seen = []
    orig = job.on

    def spy(kind, info, now):
        r = orig(kind, info, now)
        seen.append((kind, job.work.fraction(), job.work.eta(now)))
        return r

    job.on = spy
    run_synthetic(job, clock, report)
    w = job.work
    assert w.fraction() == 1.0 and w.eta(clock()) == 0.0
    assert w.phases["train"].rate(clock()) == pytest.approx(400 / 20)  # trained samples / training time
    assert w.phases["score"].rate(clock()) == pytest.approx(200 / 2)  # scored samples / scoring time, not 200 / 22
    fr = [f for _, f, _ in seen if f is not None]
    assert fr == sorted(fr), "the overall fraction never goes back"
    # after the first epoch: 1 epoch left (10 s at its measured speed) + 200 scored samples at a third of a training sample's cost
    after_epoch = next(e for k, _, e in seen if k == "train_epoch")
    assert after_epoch == pytest.approx(10.0 + 200 * 10.0 / (200 * TRAIN_COST), rel=1e-6)
    lines = out.getvalue().splitlines()
    assert all(LINE.match(x) or " score: 2 shard(s)" in x for x in lines), lines
    assert LINE.match(lines[-1]).group(2) == "100"
    assert any("score shard 2/2 · 200/200 samples · 100 samples/s" in x for x in lines), lines


def test_off_a_terminal_lines_come_at_most_every_n_seconds_and_at_every_phase_change():
    clock, out = Clock(), io.StringIO()
    report = make_report(Lines(30.0, out, wall=lambda: 0.0), clock=clock)
    run_synthetic(report.job, clock, report, train_s=100.0, score_s=2.0)
    text = out.getvalue()
    steps = [x for x in text.splitlines() if "· train run 1/1 epoch" in x and "done:" not in x]
    # 8 steps 25 s apart: a line when training starts, then one each ≥ 30 s → every other step
    assert 3 <= len(steps) <= 5, text
    assert sum("done: loss" in x for x in text.splitlines()) == 2  # each epoch's summary
    assert "score shard 1/2" in text and re.search(r"\[100%\] ETA 0s · score: 2 shard\(s\) done", text)


@pytest.mark.parametrize("raw,want", [(None, 30.0), ("0", 0.0), ("2.5", 2.5), ("600", 30.0), ("junk", 30.0), ("-1", 0.0)])
def test_line_interval_comes_from_the_environment_capped_at_30s(monkeypatch, raw, want):
    if raw is None:
        monkeypatch.delenv("DATAPRUNE_PROGRESS_EVERY", raising=False)
    else:
        monkeypatch.setenv("DATAPRUNE_PROGRESS_EVERY", raw)
    assert every_s() == want


def test_shard_rows_are_counted_cheaply_and_refined_from_seen_shards(tmp_path):
    make_demo(str(tmp_path / "d"), n=90, shard_size=30, seed=1)
    from dataprune.sources import open_source

    shards = open_source(str(tmp_path / "d")).list_shards()
    est = estimate_rows(shards, probe=1)
    assert est["rows"][shards[0].index] == 30  # counted from the tar's headers
    assert all(abs(est["rows"][s.index] - 30) < 3 for s in shards)  # the others at its rows per byte
    rows = Rows({"rows": {0: None, 1: None}, "bytes": {0: 1000, 1: 3000}, "exact": []})
    assert rows.of([0, 1]) is None
    rows.observe(0, 10)
    assert rows.of([0, 1]) == pytest.approx(40)


def test_status_and_time_formats():
    assert [fmt_secs(s) for s in (None, 4.4, 130, 3725)] == ["?", "4s", "2m10s", "1h02m"]
    job = Job()
    job.on("plan", plan_event(epochs=0), 0.0)
    assert status(job, 0.0).startswith("[  0%] ETA ?")


# ------------------------------------------------------------------------------ the real CLI

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("progress")
    make_demo(str(d / "data"), n=160, shard_size=40, seed=2)
    return d


ARGS = ["--metric", "el2n,forgetting", "--epochs", "2", "--model", "test_resnet", "--batch-size", "32", "--workers", "0"]


def test_cli_off_a_terminal_prints_timestamped_lines_with_percent_and_eta_up_to_100(demo):
    env = dict(os.environ, DATAPRUNE_PROGRESS_EVERY="0", PYTHONWARNINGS="ignore")
    p = subprocess.run(CLI + ["score", str(demo / "data"), *ARGS, "--out", str(demo / "plain")], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stderr.splitlines() if re.match(STAMP, x)]
    prog = [LINE.match(x) for x in lines if LINE.match(x)]
    assert len(prog) >= 10, p.stderr
    phases = " ".join(m.group(4) for m in prog)
    assert "train run 1/1 epoch 1/2" in phases and "train run 1/1 epoch 2/2" in phases and "score shard 4/4" in phases
    assert all(m.group(2) != "?" for m in prog), "the row count of the tar shards is known up front"
    assert prog[-1].group(2) == "100" and prog[-1].group(3) == "0s"
    assert any(re.fullmatch(r"\d+s|\d+m\d\ds", m.group(3)) for m in prog[:-1])
    assert re.search(r"score shard \d/4 · \d+/160 samples · [\d.]+ samples/s", phases)
    assert re.search(r"epoch 1/2 · \d+/320 samples", phases)  # 2 epochs × 160 samples: a total, not 3200/?


def test_result_carries_per_phase_seconds_and_samples(demo):
    from dataprune.engine import ScoreConfig, score

    events = []
    r = score(ScoreConfig(data=str(demo / "data"), metrics=("el2n",), out=str(demo / "api"), model="test_resnet", epochs=1,
                          batch_size=32, workers=0), on_event=lambda k, i: events.append(k))
    assert r["samples"] == r["seen"] == 160
    assert set(r["phase_seconds"]) == {"train", "embed", "global", "score"}
    assert r["phase_seconds"]["train"] > 0 and r["phase_seconds"]["score"] > 0
    assert r["phase_seconds"]["train"] + r["phase_seconds"]["score"] <= r["seconds"]
    assert r["phase_samples"] == {"train": 160, "embed": 0, "score": 160}
    assert r["train"]["epochs_trained"] == 1 and r["train"]["samples_per_epoch"] == 160
    assert {"plan", "train_start", "train_step", "train_epoch", "score_start", "score_batch", "shard"} <= set(events)
    json.dumps(r)


def test_cli_on_a_terminal_shows_an_overall_bar_with_an_eta(demo):
    import pty
    import select

    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONWARNINGS="ignore", TERM="xterm-256color", COLUMNS="140", LINES="30")
    env.pop("NO_COLOR", None)
    p = subprocess.Popen(CLI + ["score", str(demo / "data"), *ARGS, "--out", str(demo / "tty")], stdin=slave, stdout=slave,
                         stderr=slave, env=env, close_fds=True)
    os.close(slave)
    buf = b""
    while True:
        r, _, _ = select.select([master], [], [], 60)
        if not r:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        buf += chunk
    p.wait(timeout=60)
    os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.decode("utf-8", "replace"))
    assert p.returncode == 0, text[-2000:]
    assert re.search(r"overall\s.*\d+%.*ETA (\d+s|\d+m\d\ds|\?)", text), text[-2000:]
    assert re.search(r"train run 1/1 epoch \d/2.*samples/s.*ETA", text), text[-2000:]
    assert "overall" in text and "100%" in text
