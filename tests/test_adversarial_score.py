"""Hostile inputs and faults on the score → select → curve side, through the real CLI (issue 12).

Each test is one mechanism, tried on generated inputs in ``tmp_path``: score tables are untrusted
(metadata, done-markers, parts, column types), a resume verifies every part it would skip, a model
that outputs NaN/inf scores rows as ``nan_score``, one writer per output (``OUT/.dataprune.lock``),
every option bounded, an OS error names its file, labels beyond int32 never crash. Every check asserts
the exit code, the one line (no traceback), what was written (nothing outside ``--out``) and that the
good rows beside the bad ones survive. Kills land at seeded random points after the first part.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune.demo import make_demo

TINY = "test_resnet"
TRAIN = ["--metric", "el2n", "--model", TINY, "--epochs", "1", "--batch-size", "8", "--workers", "0"]
ENV = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")


def cli(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataprune.cli", *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=timeout, **kw)


def one_line(p: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The run failed with ``code`` and one line on stderr holding ``words`` — never a traceback."""
    err = p.stderr.strip()
    assert p.returncode == code, f"exit {p.returncode}, wanted {code}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr
    last = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(last) == 1, err
    for w in words:
        assert w in last[0], f"{w!r} not in {last[0]!r}"
    return last[0]


def table(out) -> pd.DataFrame:
    """Every part's rows by sample_id (values, not bytes), status as plain strings."""
    t = pd.concat([pd.read_parquet(os.path.join(out, "parts", f)) for f in sorted(os.listdir(os.path.join(out, "parts")))])
    t = t.sort_values("sample_id").reset_index(drop=True)[["sample_id", "key", "label", "status"] +
                                                         [c for c in t.columns if c in ("el2n", "loss", "entropy")]]
    return t.astype({"key": str, "status": str})


def files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The demo data, a finished reference table, a tiny checkpoint and one with NaN weights."""
    import timm
    import torch
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("adv")
    make_demo(str(d / "data"), n=40, shard_size=10)
    r = cli("score", d / "data", *TRAIN, "--out", d / "ref")
    assert r.returncode == 0, r.stderr
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in timm.create_model(TINY, num_classes=10).state_dict().items()}
    save_file(sd, str(d / "ok.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in sd.items()}, str(d / "nan.safetensors"))
    return d


def copy_ref(ref, tmp_path, name="t"):
    shutil.copytree(ref / "ref", tmp_path / name)
    return tmp_path / name


# ------------------------------------------------------------------------- untrusted score tables

BAD_META = {
    "not JSON": b"{not json",
    "a JSON list": b"[1, 2]",
    "empty": b"",
    "metrics a list": json.dumps({"kind": "scores", "metrics": ["el2n"]}).encode(),
    "metric entry a string": json.dumps({"kind": "scores", "metrics": {"el2n": "hard"}}).encode(),
    "shards a string": json.dumps({"kind": "scores", "metrics": {}, "shards": "part-0"}).encode(),
    "classes of numbers": json.dumps({"kind": "scores", "metrics": {}, "classes": [1, 2]}).encode(),
    "range of strings": json.dumps({"kind": "scores", "metrics": {"el2n": {"range": ["a", "b"]}}}).encode(),
    "deeply nested": b"[" * 100000,
}


def test_malformed_metadata_is_one_line(ref, tmp_path, mk):
    t = copy_ref(ref, tmp_path)
    before = files(tmp_path)
    for i, (case, data) in enumerate(BAD_META.items()):
        (t / "_dataprune.json").write_bytes(data)
        run = cli if i == 0 else mk.cli_fast  # the real CLI once, its in-process runner for the variants
        p = run("select", t, "--frac", "0.5", "--out", tmp_path / "m.parquet")
        assert p.returncode == 5 and "_dataprune.json" in p.stderr and "Traceback" not in p.stderr, (case, p.stderr)
        assert files(tmp_path) == before, case
    (t / "_dataprune.json").write_text('{"kind": "scores", "metrics": {"el2n": [1]}, "config": "x"}')
    one_line(cli("score", ref / "data", *TRAIN, "--out", t), 5, str(t / "_dataprune.json"), "--overwrite")
    curve = mk.cli_fast("curve", ref / "data", "--scores", t, "--test", ref / "data", "--fracs", "1.0", "--keep", "hard",
                        "--epochs", "1", "--model", TINY, "--workers", "0", "--out", tmp_path / "c")
    assert curve.returncode == 5 and "_dataprune.json" in curve.stderr, curve.stderr
    shutil.rmtree(t / "_done")  # damaged metadata before any part is finished: rewritten, the table scored afresh
    shutil.rmtree(t / ".train", ignore_errors=True)  # a finished run removed its checkpoints
    (t / "_dataprune.json").write_bytes(b"\x00\xff")
    assert mk.cli_fast("score", ref / "data", *TRAIN, "--out", t).returncode == 0
    pd.testing.assert_frame_equal(table(t), table(ref / "ref"))


def test_stray_and_damaged_markers(ref, tmp_path, mk):
    t = copy_ref(ref, tmp_path)
    (t / "_done" / "part-abcdef.json").write_text("{}")  # not a marker name: ignored everywhere
    (t / "_done" / "part-000099.json").write_text("{}")  # beyond the table's 4 shards: not a part of it
    shutil.copy(t / "parts" / "part-000000.parquet", t / "parts" / "part-000099.parquet")
    p = cli("select", t, "--frac", "1.0", "--json", "--out", tmp_path / "m.parquet")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["summary"]["rows"] == 40
    for f in ("_done/part-000099.json", "parts/part-000099.parquet"):
        (t / f).unlink()
    damages = {"part-000001.json": "not json", "part-000002.json": '["a list"]', "part-000003.json": '{"part": {"rows": "ten"}}'}
    for name, damage in damages.items():
        good = (t / "_done" / name).read_text()
        (t / "_done" / name).write_text(damage)
        p = mk.cli_fast("select", t, "--frac", "0.5", "--out", tmp_path / "m2.parquet")
        assert p.returncode == 5 and name in p.stderr and "rescore" in p.stderr, p.stderr
        (t / "_done" / name).write_text(good)
    assert not (tmp_path / "m2.parquet").exists()
    for name, damage in damages.items():
        (t / "_done" / name).write_text(damage)
    r = cli("score", ref / "data", *TRAIN, "--out", t, "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    s = json.loads(r.stdout)
    assert sorted(s["rescored"]) == ["1", "2", "3"] and s["shards_done_before"] == 1 and s["seen"] == 30
    pd.testing.assert_frame_equal(table(t), table(ref / "ref"))


def test_resume_rescores_only_the_damaged_parts(ref, tmp_path, mk):
    """Truncated, bit-flipped (same size: only the sha256 tells), replaced by another part, deleted:
    a reader refuses the table (by size; one line), a resume scores exactly those shards again."""
    t = copy_ref(ref, tmp_path)
    data = {i: (t / "parts" / f"part-{i:06d}.parquet").read_bytes() for i in range(4)}
    (t / "parts" / "part-000000.parquet").write_bytes(data[0][: len(data[0]) // 2])
    (t / "parts" / "part-000001.parquet").write_bytes(data[1][:200] + bytes([data[1][200] ^ 0x40]) + data[1][201:])
    shutil.copy(t / "parts" / "part-000003.parquet", t / "parts" / "part-000002.parquet")
    mtime = (t / "parts" / "part-000003.parquet").stat().st_mtime_ns
    p = cli("select", t, "--frac", "0.5", "--out", tmp_path / "m.parquet")
    one_line(p, 5, "part-000000.parquet", "truncated", "rescore")
    r = cli("score", ref / "data", *TRAIN, "--out", t)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 3 and all("scored again" in n for n in notes) and "sha256" in notes[1], notes
    assert "scored 30 of 30" in r.stdout and "1 shard(s) were already done" in r.stdout
    assert (t / "parts" / "part-000003.parquet").stat().st_mtime_ns == mtime, "an intact part is never rewritten"
    pd.testing.assert_frame_equal(table(t), table(ref / "ref"))
    (t / "parts" / "part-000003.parquet").unlink()  # a marker whose part is gone
    assert mk.cli_fast("select", t, "--frac", "0.5", "--out", tmp_path / "m.parquet").returncode == 5
    r = mk.cli_fast("score", ref / "data", *TRAIN, "--out", t)
    assert r.returncode == 0 and "part-000003.parquet: missing" in r.stderr
    pd.testing.assert_frame_equal(table(t), table(ref / "ref"))


def _retyped(ref, tmp_path, **columns):
    """A copy of the table whose part 1 has other column types, as another tool would write it
    (its marker records no part: tables from before the marker records, or from other writers)."""
    t = copy_ref(ref, tmp_path)
    p1 = pq.read_table(t / "parts" / "part-000001.parquet")
    for name, arr in columns.items():
        p1 = p1.set_column(p1.column_names.index(name), name, arr(p1))
    pq.write_table(p1, t / "parts" / "part-000001.parquet")
    (t / "_done" / "part-000001.json").write_text(json.dumps({"seen": p1.num_rows}))
    return t


def test_select_survives_foreign_column_types(ref, tmp_path):
    import decimal

    big = lambda t: pa.array([2**40] + t.column("label").to_pylist()[1:], pa.int64())  # noqa: E731 - label beyond int32
    i128 = lambda t: pa.array([decimal.Decimal(v) for v in t.column("sample_id").to_pylist()], pa.decimal128(38, 0))  # noqa: E731
    t = _retyped(ref, tmp_path, label=big, sample_id=i128)
    p = cli("select", t, "--frac", "1.0", "--json", "--out", tmp_path / "m.parquet")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    s = json.loads(p.stdout)["summary"]
    assert s["kept"] == 39 and s["excluded"] == {"status:bad_label": 1}, s  # the bad label's row only
    kept = pq.read_table(tmp_path / "m.parquet")
    assert kept.column("label").type == pa.int32() and kept.num_rows == 39
    # a foreign score file: polars' Int128 ids (decimal128 in parquet) and an int64 label beyond int32
    ft = pq.read_table(ref / "ref" / "parts" / "part-000000.parquet", columns=["sample_id", "el2n"])
    pq.write_table(pa.table({"sample_id": i128(ft), "label": pa.array([2**40] * ft.num_rows), "other": ft.column("el2n")}),
                   tmp_path / "f.parquet")
    p = cli("select", ref / "ref", tmp_path / "f.parquet", "--by", "other", "--frac", "1.0", "--json", "--out", tmp_path / "m2.parquet")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["summary"]["kept"] == 10


@pytest.mark.parametrize("case", ["metric is text", "ids are text", "ids negative", "label is text"])
def test_select_wrong_column_types_are_one_line(ref, tmp_path, mk, case):
    col, arr = {
        "metric is text": ("el2n", lambda t: pa.array(["high"] * t.num_rows)),
        "ids are text": ("sample_id", lambda t: pa.array([f"id{v}" for v in t.column("sample_id").to_pylist()])),  # digits are ids
        "ids negative": ("sample_id", lambda t: pa.array([-1] * t.num_rows, pa.int64())),
        "label is text": ("label", lambda t: pa.array(["cat"] * t.num_rows)),
    }[case]
    t = _retyped(ref, tmp_path, **{col: arr})
    one_line(cli("select", t, "--frac", "0.5", "--out", tmp_path / "m.parquet"), 5, "part-00000", repr(col))
    assert not (tmp_path / "m.parquet").exists()
    if col == "el2n":  # the curve reads tables as select does
        p = mk.cli_fast("curve", ref / "data", "--scores", t, "--test", ref / "data", "--fracs", "1.0", "--keep", "hard",
                        "--epochs", "1", "--model", TINY, "--workers", "0", "--out", tmp_path / "c")
        assert p.returncode == 5 and "'el2n'" in p.stderr, p.stderr


# ---------------------------------------------------------------------------------- faults

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_at_a_random_point_resumes_to_the_same_table(ref, tmp_path, sig):
    """Killed at a seeded random moment after the first part appeared (frozen there with SIGSTOP, so
    the signal lands before the run ends even on a fast machine): the rerun gives the same table."""
    out = tmp_path / "killed"
    delay = random.Random(int(sig)).uniform(0, 0.02)
    proc = subprocess.Popen([sys.executable, "-m", "dataprune.cli", "score", str(ref / "data"), *TRAIN, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not list(out.glob("parts/part-*.parquet")):
        time.sleep(0.002)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 130) and "Traceback" not in err, err
    finished = len(list((out / "_done").glob("part-*.json")))
    assert finished < 4, "the kill should land before the run ends"
    r = cli("score", ref / "data", *TRAIN, "--out", out, "--json")  # the killed run's lock went with it
    assert r.returncode == 0, f"killed {delay:.3f}s after the first part: {r.stderr}"
    assert json.loads(r.stdout)["shards_done_before"] == finished
    pd.testing.assert_frame_equal(table(out), table(ref / "ref"), obj=f"killed {delay:.3f}s after the first part")
    assert not [f for f in files(out) if f.endswith(".tmp") and not f.startswith(".train")]
    for i in range(4):
        marker = json.loads((out / "_done" / f"part-{i:06d}.json").read_text())
        assert marker["part"]["bytes"] == (out / "parts" / f"part-{i:06d}.parquet").stat().st_size


def test_second_writer_on_one_out_stops_with_exit_9(ref, tmp_path):
    out = tmp_path / "s"
    args = ["score", ref / "data", "--metric", "loss", "--model", TINY, "--epochs", "0", "--checkpoint", ref / "ok.safetensors",
            "--workers", "0"]
    a = subprocess.Popen([sys.executable, "-m", "dataprune.cli", *map(str, args), "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    lock = out / ".dataprune.lock"
    deadline = time.time() + 60
    while time.time() < deadline and a.poll() is None and not (lock.exists() and lock.stat().st_size):
        time.sleep(0.005)
    os.kill(a.pid, signal.SIGSTOP)  # the first run holds the lock, paused
    try:
        b = cli(*args, "--seed", "5", "--out", out)  # other parameters: without the lock it would rewrite the metadata
        one_line(b, 9, str(out), f"pid {a.pid}")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    _, err = a.communicate(timeout=60)
    assert a.returncode == 0, err
    meta = json.loads((out / "_dataprune.json").read_text())
    assert meta["config"]["seed"] == 0  # the first run's parameters
    assert len(table(out)) == 40


def test_curve_holds_its_out(ref, tmp_path):
    from dataprune.outlock import output_lock

    with output_lock(str(tmp_path / "c"), "test holder"):  # this process holds it: the CLI is another process
        p = cli("curve", ref / "data", "--scores", ref / "ref", "--test", ref / "data", "--fracs", "1.0", "--keep", "hard",
                "--epochs", "1", "--model", TINY, "--workers", "0", "--out", tmp_path / "c")
    one_line(p, 9, "test holder", f"pid {os.getpid()}")
    assert files(tmp_path / "c") == {".dataprune.lock"}


def test_disk_full_names_the_file(ref, tmp_path):
    """Writes beyond RLIMIT_FSIZE fail with EFBIG, as on a full disk: the line names the file being written."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2500, 2500))

    p = cli("score", ref / "data", "--metric", "loss", "--model", TINY, "--epochs", "0", "--checkpoint", ref / "ok.safetensors",
            "--workers", "0", "--out", tmp_path / "s", preexec_fn=limit)
    line = one_line(p, 1, str(tmp_path / "s"))
    assert "File too large" in line or "No space" in line
    assert not [f for f in files(tmp_path / "s") if f.endswith(".tmp")]


# ------------------------------------------------------------------------------ NaN scores

def test_model_outputting_nan_scores_rows_as_nan_score(ref, tmp_path, mk):
    args = ["score", ref / "data", "--metric", "loss,entropy", "--model", TINY, "--epochs", "0", "--workers", "0", "--batch-size", "8"]
    p = mk.cli_fast(*args, "--checkpoint", ref / "nan.safetensors", "--out", tmp_path / "all")  # NaN weights
    assert p.returncode == 0 and "scored 0 of 40" in p.stdout and "nan_score=40" in p.stdout, p.stdout
    t = pd.read_parquet(tmp_path / "all")
    assert (t["status"] == "nan_score").all() and t["error"].str.contains(r"demo-00000\d\.tar: sample '\d+': loss is nan").all()
    one_line(cli("select", tmp_path / "all", "--by", "loss", "--frac", "0.5", "--out", tmp_path / "m.parquet"), 5, "nan_score=40")
    # a model whose output is NaN for some samples only: those are nan_score, the others keep their values
    patch = ("import sys, dataprune.models as M\nmake = M.create_model\n"
             "def create_model(spec):\n    m = make(spec)\n    fwd = m.forward\n"
             "    def forward(x):\n        y = fwd(x)\n        y[::3] = float('inf')\n        return y\n"
             "    m.forward = forward\n    return m\n"
             "M.create_model = create_model\nfrom dataprune.cli import main\nsys.argv[0] = 'dataprune'\nmain()\n")
    good = mk.cli_fast(*args, "--checkpoint", ref / "ok.safetensors", "--out", tmp_path / "good")
    part = subprocess.run([sys.executable, "-c", patch, *map(str, args), "--checkpoint", str(ref / "ok.safetensors"),
                           "--out", str(tmp_path / "some")], capture_output=True, text=True, env=ENV, timeout=120)
    assert good.returncode == 0 and part.returncode == 0 and "Traceback" not in part.stderr, part.stderr
    a, b = table(tmp_path / "good"), table(tmp_path / "some")
    bad = b["status"] == "nan_score"
    assert 10 <= bad.sum() < 40 and np.isnan(b.loc[bad, "loss"]).all() and (b.loc[~bad, "status"] == "ok").all()
    pd.testing.assert_frame_equal(a[~bad], b[~bad])
    assert f"nan_score={int(bad.sum())}" in part.stdout and f"scored {40 - int(bad.sum())} of 40" in part.stdout


# ---------------------------------------------------------------------------- option bounds

SCORE_BAD = [("--image-size", "100000"), ("--image-size", "7"), ("--batch-size", "1000000000000000"), ("--batch-size", "0"),
             ("--runs", "100000000"), ("--num-classes", "1000000000"), ("--max-pixels", "100000000000000000000"),
             ("--seed", "100000000000000000000"), ("--seed", "-1"), ("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"),
             ("--weight-decay", "nan"), ("--kmeans-sample", "0"), ("--kmeans-iters", "-5"), ("--kmeans-iters", "1000000000"),
             ("--clusters", "0"), ("--clusters", "1000000000"), ("--epochs", "1000000000"), ("--workers", "1000000"),
             ("--shuffle-buffer", "1000000000000"), ("--eps", "nan"), ("--score-epoch", "5")]
SELECT_BAD = [("--count", str(2**64)), ("--count", "0"), ("--frac", "nan"), ("--frac", "inf"), ("--seed", str(2**64)),
              ("--seed", "-1"), ("--strategy", "ccs", "--ccs-strata", "1000000000"), ("--strategy", "ccs", "--ccs-strata", "0"),
              ("--drop-hardest", "nan"), ("--min-score", "nan")]
CURVE_BAD = [("--epochs", "0"), ("--epochs", "1000000000"), ("--repeats", "1000000"), ("--fracs", "1e-9"), ("--fracs", "nan"),
             ("--seed", str(2**40)), ("--image-size", "100000"), ("--batch-size", "0"), ("--lr", "nan")]


def test_every_option_is_bounded(ref, tmp_path, mk):
    """Out-of-range values stop with exit 2 and one line naming the option, before anything is written
    (the in-process runner: the same commands, each exception that would be a traceback fails here)."""
    before = files(tmp_path)
    for opt in SCORE_BAD:
        r = mk.cli_fast("score", ref / "data", "--metric", "el2n", "--model", TINY, "--workers", "0", "--out", tmp_path / "s",
                        *(opt if opt[0] != "--score-epoch" else opt + ("--epochs", "1")))
        assert r.returncode == 2 and opt[0] in r.stderr.replace("\n", " ") and "Traceback" not in r.stderr, (opt, r.stderr)
    for opt in SELECT_BAD:
        r = mk.cli_fast("select", ref / "ref", *(opt if "--frac" in opt or "--count" in opt else opt + ("--frac", "0.5")),
                        "--out", tmp_path / "m.parquet")
        assert r.returncode == 2 and "Traceback" not in r.stderr, (opt, r.stderr)
    for opt in CURVE_BAD:
        r = mk.cli_fast("curve", ref / "data", "--scores", ref / "ref", "--test", ref / "data", "--model", TINY, "--workers", "0",
                        "--keep", "hard", *(("--fracs", "1.0") if opt[0] != "--fracs" else ()), *opt, "--out", tmp_path / "c")
        assert r.returncode == 2 and "Traceback" not in r.stderr, (opt, r.stderr)
    assert files(tmp_path) == before
    p = cli("score", ref / "data", "--metric", "el2n", "--image-size", "100000", "--out", tmp_path / "s")  # the real CLI, too
    one_line(p, 2, "--image-size", "4,096")
    p = mk.cli_fast("score", ref / "data", "--metric", "prototypes", "--clusters", "41", "--model", TINY, "--epochs", "0",
                    "--checkpoint", ref / "ok.safetensors", "--workers", "0", "--out", tmp_path / "p")
    assert p.returncode == 2 and "--clusters 41" in p.stderr and "40 rows" in p.stderr, p.stderr  # as --count above the candidates


# -------------------------------------------------------------------------- labels beyond int32

def test_labels_beyond_int32_never_crash_the_engine(tmp_path, mk):
    members = []
    for i, lbl in enumerate([3, 2**31, 5, 2**40, 7]):
        members += mk.sample(f"k{i}", None, mk.jpeg(i))
        members.append((f"k{i}.cls", str(lbl).encode()))
    shard = mk.tar(tmp_path / "data" / "a-000000.tar", members)
    (tmp_path / "data" / "classes.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    # entropy needs no labels: the labels are never checked against a classifier head, only against int32
    p = cli("score", tmp_path / "data", "--metric", "entropy", "--model", TINY, "--epochs", "1", "--workers", "0",
            "--batch-size", "2", "--out", tmp_path / "s")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    t = pd.read_parquet(tmp_path / "s").set_index("key")
    assert list(t["status"]) == ["ok", "bad_label", "ok", "bad_label", "ok"], t["status"]
    assert t.loc["k1", "error"].startswith(shard) and np.isfinite(t.loc[["k0", "k2", "k4"], "entropy"]).all()
    p = cli("select", tmp_path / "s", "--frac", "1.0", "--json", "--out", tmp_path / "m.parquet")
    assert p.returncode == 0 and json.loads(p.stdout)["summary"]["kept"] == 3, p.stderr
