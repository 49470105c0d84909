"""`dataprune score`: engine, resume, safety, and the training-dynamics metrics on real (tiny) training runs."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from dataprune.demo import make_demo
from dataprune.engine import ScoreConfig, score
from dataprune.errors import ConfigError

CLI = [sys.executable, "-m", "dataprune.cli"]
TINY = "test_resnet"  # timm's 0.4M-parameter test network


def run_cli(*args, cwd=None, check=True, timeout=300):
    p = subprocess.run(CLI + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    npos, nneg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def save_checkpoint(path, num_classes=10, seed=0):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    m = timm.create_model(TINY, num_classes=num_classes)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    d = tmp_path_factory.mktemp("noisy")
    make_demo(str(d / "data"), n=1000, shard_size=250, label_noise=0.1, seed=3)
    flipped = set((d / "data" / "flipped.txt").read_text().split())
    return d, flipped


@pytest.fixture(scope="module")
def noisy_scores(noisy):
    d, flipped = noisy
    cfg = ScoreConfig(data=str(d / "data"), metrics=("el2n", "forgetting", "aum", "loss"), out=str(d / "scores"), model=TINY,
                      epochs=8, batch_size=64, workers=1, lr=0.05, seed=0, runs=2)
    r = score(cfg)
    t = pd.read_parquet(d / "scores")
    t["flipped"] = t["key"].isin(flipped)
    return r, t


@pytest.mark.parametrize("metric", ["el2n", "aum", "forgetting"])
def test_training_metrics_rank_flipped_labels_above_clean(noisy_scores, metric):
    r, t = noisy_scores
    assert r["scored"] == 1000 and r["seen"] == 1000
    assert t["flipped"].sum() > 60
    value = auroc(t[metric].to_numpy(np.float64), t["flipped"].to_numpy())
    assert value >= 0.8, f"{metric} AUROC {value:.3f}"


def test_runs_give_std_columns_and_reliability(noisy_scores, noisy):
    r, t = noisy_scores
    for m in ("el2n", "forgetting", "aum", "loss"):
        assert m + "_std" in t.columns
        assert (t[m + "_std"] >= 0).all()
    assert set(r["reliability"]) == {"el2n", "forgetting", "aum", "loss"}
    assert all(-1 <= v <= 1 for v in r["reliability"].values())
    import json

    meta = json.loads((noisy[0] / "scores" / "_dataprune.json").read_text())
    assert meta["reliability"] == r["reliability"]
    assert meta["metrics"]["el2n"]["direction"] == "higher = harder"


def test_forgetting_never_learned_value_is_above_learned(noisy_scores):
    _, t = noisy_scores
    epochs = 8
    never = t["forgetting"] == epochs + 1  # the documented value for never-learned samples (mean over 2 runs)
    assert never.any() and (~never).any()
    assert t.loc[~never, "forgetting"].max() < epochs + 1
    assert t.loc[never, "flipped"].mean() > t.loc[~never, "flipped"].mean()  # mostly the flipped labels


def test_grand_equals_one_example_at_a_time_autograd():
    import timm
    import torch.nn.functional as F

    from dataprune.metrics.grand import grand_scores

    torch.manual_seed(0)
    model = timm.create_model(TINY, num_classes=5).eval()
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for params in ("all", "head"):
        got = grand_scores(model, x, y, params)
        want = []
        for i in range(len(x)):
            model.zero_grad()
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            loss.backward()
            if params == "all":
                sq = sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)
            else:
                head = model.get_classifier()
                sq = head.weight.grad.pow(2).sum() + head.bias.grad.pow(2).sum()
            want.append(float(sq.sqrt()))
        np.testing.assert_allclose(got.numpy(), np.array(want), rtol=1e-4)


def test_grand_metric_through_the_engine(tmp_path):
    make_demo(str(tmp_path / "data"), n=40, shard_size=20)
    r = score(ScoreConfig(data=str(tmp_path / "data"), metrics=("grand",), out=str(tmp_path / "s"), model=TINY, epochs=0,
                          workers=0, batch_size=16, runs=2))
    t = pd.read_parquet(tmp_path / "s")
    assert r["scored"] == 40 and t["grand"].notna().all() and (t["grand"] > 0).all() and "grand_std" in t.columns


def _table(path):
    t = pd.read_parquet(path)
    return t.sort_values("sample_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    make_demo(str(d / "data"), n=1200, shard_size=40)  # 30 shards: the run must still be going when the signal lands
    ck = save_checkpoint(d / "m.safetensors")
    args = ["score", d / "data", "--metric", "loss,margin,entropy", "--epochs", "0", "--checkpoint", ck, "--model", TINY,
            "--workers", "0", "--batch-size", "8"]
    run_cli(*args, "--out", d / "full")
    return d, args


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_interrupted_run_resumes_to_the_same_table(kill_setup, sig):
    d, args = kill_setup
    out = d / f"killed-{int(sig)}"
    proc = subprocess.Popen(CLI + [str(a) for a in args] + ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    done = out / "_done"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done.is_dir() and len(list(done.glob("part-*.json"))) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate()
    if sig != signal.SIGKILL:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    finished = len(list(done.glob("part-*.json")))
    assert 2 <= finished < 30, "the run should be stopped part-way"
    assert not [p for p in out.iterdir() if p.name.startswith("part-")]  # parts are in parts/, temporary files hidden
    assert all(p.name.startswith("part-") and p.name.endswith(".parquet") for p in (out / "parts").iterdir())
    r = run_cli(*args, "--out", out, "--json")
    import json

    summary = json.loads(r.stdout)
    assert summary["shards_done_before"] == finished
    a, b = _table(d / "full"), _table(out)
    assert len(a) == len(b) == 1200
    pd.testing.assert_frame_equal(a, b)


def test_rerun_with_other_parameters_needs_overwrite(tmp_path):
    make_demo(str(tmp_path / "data"), n=20, shard_size=10)
    ck = save_checkpoint(tmp_path / "m.safetensors")
    base = ["score", tmp_path / "data", "--epochs", "0", "--checkpoint", ck, "--model", TINY, "--workers", "0", "--out", tmp_path / "s"]
    run_cli(*base, "--metric", "loss")
    p = run_cli(*base, "--metric", "entropy", check=False)
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    run_cli(*base, "--metric", "entropy", "--overwrite")
    t = pd.read_parquet(tmp_path / "s")
    assert "entropy" in t.columns and "loss" not in t.columns and len(t) == 20


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARK', '/tmp/dataprune-evil')}",))


def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    make_demo(str(tmp_path / "data"), n=10, shard_size=10)
    mark = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    os.environ["EVIL_MARK"] = str(mark)
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    p = run_cli("score", tmp_path / "data", "--metric", "loss", "--epochs", "0", "--checkpoint", evil, "--model", TINY,
                "--out", tmp_path / "s", check=False)
    assert p.returncode == 2
    assert "refused" in p.stderr and "Traceback" not in p.stderr
    assert not mark.exists()
    assert not (tmp_path / "s").exists()


def test_pt_checkpoint_with_plain_tensors_loads(tmp_path):
    import timm

    torch.manual_seed(1)
    m = timm.create_model(TINY, num_classes=10)
    torch.save({"state_dict": m.state_dict()}, tmp_path / "m.pt")
    make_demo(str(tmp_path / "data"), n=10, shard_size=10)
    r = score(ScoreConfig(data=str(tmp_path / "data"), metrics=("loss",), out=str(tmp_path / "s"), model=TINY, epochs=0,
                          checkpoint=str(tmp_path / "m.pt"), workers=0))
    assert r["scored"] == 10


def test_bad_samples_are_counted_and_kept_in_the_table(tmp_path):
    from dataprune import tario

    d = tmp_path / "data"
    make_demo(str(d), n=20, shard_size=20)
    # append a shard with one good and one corrupt image
    good = (d / "demo-000000.tar").read_bytes()
    from dataprune.sources import open_source

    src = open_source(str(d))
    first = next(src.iter_samples(src.list_shards()[0]))
    chunks = []
    for key, img in (("good", first.image), ("bad", b"\xff\xd8\xff\xe0 definitely not a jpeg")):
        for ext, data in (("jpg", img), ("cls", b"1")):
            chunks += [tario.member_header(f"{key}.{ext}", len(data)), data, tario.padding(len(data))]
    body = b"".join(chunks)
    (d / "demo-000001.tar").write_bytes(body + tario.end_of_archive(len(body)))
    assert good
    ck = save_checkpoint(tmp_path / "m.safetensors")
    r = score(ScoreConfig(data=str(d), metrics=("loss",), out=str(tmp_path / "s"), model=TINY, epochs=0, checkpoint=str(ck), workers=0))
    assert r["seen"] == 22 and r["scored"] == 21 and r["reasons"] == {"decode_error": 1}
    t = pd.read_parquet(tmp_path / "s")
    bad = t[t["key"] == "bad"].iloc[0]
    assert bad["status"] == "decode_error" and np.isnan(bad["loss"]) and "bad" in bad["error"]
    with pytest.raises(Exception) as e:
        score(ScoreConfig(data=str(d), metrics=("loss",), out=str(tmp_path / "s2"), model=TINY, epochs=0, checkpoint=str(ck),
                          workers=0, on_error="raise"))
    assert "bad" in str(e.value)


def test_device_auto_falls_back_and_cuda_is_a_clear_error(tmp_path):
    make_demo(str(tmp_path / "data"), n=10, shard_size=10)
    ck = save_checkpoint(tmp_path / "m.safetensors")
    r = score(ScoreConfig(data=str(tmp_path / "data"), metrics=("entropy",), out=str(tmp_path / "s"), model=TINY, epochs=0,
                          checkpoint=str(ck), workers=0, device="auto"))
    assert r["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        p = run_cli("score", tmp_path / "data", "--metric", "entropy", "--epochs", "0", "--model", TINY, "--device", "cuda",
                    "--checkpoint", ck, "--out", tmp_path / "s2", check=False)
        assert p.returncode == 2 and "CUDA" in p.stderr and "Traceback" not in p.stderr


def test_untrained_network_is_refused_for_model_output_metrics(tmp_path):
    make_demo(str(tmp_path / "data"), n=10, shard_size=10)
    with pytest.raises(ConfigError, match="untrained"):
        score(ScoreConfig(data=str(tmp_path / "data"), metrics=("el2n",), out=str(tmp_path / "s"), model=TINY, epochs=0))


def test_unknown_metric_lists_available(tmp_path):
    make_demo(str(tmp_path / "data"), n=10, shard_size=10)
    with pytest.raises(ConfigError, match="available: .*el2n"):
        score(ScoreConfig(data=str(tmp_path / "data"), metrics=("nope",), out=str(tmp_path / "s")))


def test_training_killed_mid_run_resumes_from_the_epoch_checkpoint(tmp_path):
    make_demo(str(tmp_path / "data"), n=120, shard_size=30)
    args = ["score", tmp_path / "data", "--metric", "forgetting,aum,el2n", "--model", TINY, "--batch-size", "16", "--workers", "0",
            "--lr", "0.05", "--epochs", "3"]
    run_cli(*args, "--out", tmp_path / "full")
    proc = subprocess.Popen(CLI + [str(a) for a in args] + ["--out", str(tmp_path / "killed")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    ck = tmp_path / "killed" / ".train" / "run-0.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ck.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch = torch.load(ck, weights_only=True)["epoch"]
    assert 1 <= epoch < 3, "the run should be killed during training"
    r = run_cli(*args, "--out", tmp_path / "killed")
    assert f"resuming after epoch {epoch}" in r.stderr
    pd.testing.assert_frame_equal(_table(tmp_path / "full"), _table(tmp_path / "killed"))


def test_torchrun_two_cpu_ranks_give_the_same_table_as_one_process(tmp_path):
    make_demo(str(tmp_path / "data"), n=90, shard_size=15)
    ck = save_checkpoint(tmp_path / "m.safetensors")
    args = ["score", str(tmp_path / "data"), "--metric", "loss,entropy", "--epochs", "0", "--checkpoint", str(ck), "--model", TINY,
            "--workers", "0", "--batch-size", "8"]
    run_cli(*args, "--out", tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517", "-m",
                        "dataprune.cli", *args, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    parts = sorted(os.listdir(tmp_path / "two" / "_done"))
    assert len(parts) == 6
    stats = [json.loads((tmp_path / "two" / "_done" / f).read_text()) for f in parts]
    assert sum(s["seen"] for s in stats) == 90
    pd.testing.assert_frame_equal(_table(tmp_path / "one"), _table(tmp_path / "two"), check_exact=False, rtol=1e-5)


def test_used_by_command_works_verbatim_on_an_image_folder(tmp_path):
    from PIL import Image

    from dataprune.demo import render

    rng = np.random.default_rng(0)
    for c, name in enumerate(["n01440764", "n01443537", "n01484850"]):
        os.makedirs(tmp_path / "imagenet" / name)
        for i in range(12):
            Image.fromarray(render(c, rng, 32)).save(tmp_path / "imagenet" / name / f"{name}_{i}.JPEG")
    run_cli("score", "imagenet/", "--metric", "el2n", cwd=tmp_path)
    t = pd.read_parquet(tmp_path / "dataprune-out" / "scores")
    assert len(t) == 36 and t["el2n"].notna().all()
    assert sorted(t["label"].unique()) == [0, 1, 2]
    assert t["key"].str.startswith("n014").all()


def test_trained_proxy_is_saved_and_reusable_as_a_checkpoint(tmp_path):
    make_demo(str(tmp_path / "data"), n=40, shard_size=20)
    score(ScoreConfig(data=str(tmp_path / "data"), metrics=("el2n",), out=str(tmp_path / "a"), model=TINY, epochs=1, workers=0,
                      batch_size=16))
    proxy = tmp_path / "a" / "_proxy-run0.safetensors"
    assert proxy.exists()
    a = pd.read_parquet(tmp_path / "a")  # the proxy file does not disturb readers of the table
    r = score(ScoreConfig(data=str(tmp_path / "data"), metrics=("el2n",), out=str(tmp_path / "b"), model=TINY, epochs=0,
                          checkpoint=str(proxy), workers=0, batch_size=16))
    b = pd.read_parquet(tmp_path / "b")
    assert r["scored"] == 40
    np.testing.assert_allclose(a.sort_values("sample_id")["el2n"], b.sort_values("sample_id")["el2n"], rtol=1e-4, atol=1e-6)


# ---- regressions found in review


def test_mixed_image_sizes_and_out_of_range_labels(tmp_path):
    from PIL import Image

    from dataprune.demo import render

    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(tmp_path / "mixed" / f"c{c}")
        for i in range(5):
            Image.fromarray(render(c, rng, 32)).save(tmp_path / "mixed" / f"c{c}" / f"{i}.png")
        Image.fromarray(render(c, rng, 48)[:40]).save(tmp_path / "mixed" / f"c{c}" / "big.png")
    ck = save_checkpoint(tmp_path / "m3.safetensors", num_classes=3)
    r = score(ScoreConfig(data=str(tmp_path / "mixed"), metrics=("loss",), out=str(tmp_path / "s"), model=TINY, checkpoint=str(ck),
                          workers=0))
    assert r["scored"] == 18 and r["image_size"] == 32
    # a label outside the class list is a counted skip, not a crash
    make_demo(str(tmp_path / "d"), n=10, shard_size=10)
    from dataprune import tario

    img = (tmp_path / "mixed" / "c0" / "0.png").read_bytes()
    body = b"".join([tario.member_header("odd.png", len(img)), img, tario.padding(len(img)),
                     tario.member_header("odd.cls", 2), b"12", tario.padding(2)])
    (tmp_path / "d" / "demo-000001.tar").write_bytes(body + tario.end_of_archive(len(body)))
    ck10 = save_checkpoint(tmp_path / "m10.safetensors")
    r = score(ScoreConfig(data=str(tmp_path / "d"), metrics=("loss",), out=str(tmp_path / "s2"), model=TINY, checkpoint=str(ck10),
                          workers=0))
    assert r["scored"] == 10 and r["reasons"] == {"bad_label": 1}
    r = score(ScoreConfig(data=str(tmp_path / "d"), metrics=("forgetting",), out=str(tmp_path / "s3"), model=TINY, epochs=1,
                          workers=0, batch_size=8))
    assert r["reasons"] == {"bad_label": 1}


def test_vit_is_scored_at_its_own_input_size(tmp_path):
    from dataprune.engine import plan

    make_demo(str(tmp_path / "data"), n=10, shard_size=10)
    p = plan(ScoreConfig(data=str(tmp_path / "data"), metrics=("loss",), model="test_vit", epochs=1))
    assert p.image_size != 32  # a patch-grid model cannot take the 32 px native size
    q = plan(ScoreConfig(data=str(tmp_path / "data"), metrics=("loss",), model=TINY, epochs=1))
    assert q.image_size == 32


def test_a_training_batch_of_one_is_skipped(tmp_path):
    make_demo(str(tmp_path / "data"), n=33, shard_size=33)
    r = score(ScoreConfig(data=str(tmp_path / "data"), metrics=("forgetting",), out=str(tmp_path / "s"), model=TINY, epochs=1,
                          workers=0, batch_size=32))
    assert r["scored"] == 33


def test_bf16_checkpoint_and_head_mismatch(tmp_path):
    import timm
    from safetensors.torch import save_file

    make_demo(str(tmp_path / "data"), n=10, shard_size=10)
    torch.manual_seed(0)
    m = timm.create_model(TINY, num_classes=10)
    save_file({k: v.to(torch.bfloat16).contiguous() if v.is_floating_point() else v for k, v in m.state_dict().items()},
              str(tmp_path / "bf16.safetensors"))
    r = score(ScoreConfig(data=str(tmp_path / "data"), metrics=("loss",), out=str(tmp_path / "s"), model=TINY,
                          checkpoint=str(tmp_path / "bf16.safetensors"), workers=0))
    assert r["scored"] == 10
    ck3 = save_checkpoint(tmp_path / "m3.safetensors", num_classes=3)
    with pytest.raises(ConfigError, match="3-class head"):
        score(ScoreConfig(data=str(tmp_path / "data"), metrics=("loss",), out=str(tmp_path / "s2"), model=TINY, checkpoint=str(ck3)))


def test_raise_from_a_worker_is_one_line_with_the_decode_exit_code(tmp_path):
    from dataprune import tario

    d = tmp_path / "data"
    make_demo(str(d), n=10, shard_size=10)
    bad = b"\xff\xd8\xff\xe0 not a jpeg"
    body = b"".join([tario.member_header("bad.jpg", len(bad)), bad, tario.padding(len(bad)),
                     tario.member_header("bad.cls", 1), b"1", tario.padding(1)])
    (d / "demo-000001.tar").write_bytes(body + tario.end_of_archive(len(body)))
    ck = save_checkpoint(tmp_path / "m.safetensors")
    p = run_cli("score", d, "--metric", "loss", "--checkpoint", ck, "--model", TINY, "--workers", "2", "--on-error", "raise",
                "--out", tmp_path / "s", check=False)
    assert p.returncode == 4 and "bad" in p.stderr and "Traceback" not in p.stderr and "DataLoader" not in p.stderr


def test_out_inside_the_input_is_refused_and_overwrite_only_removes_our_parts(tmp_path):
    make_demo(str(tmp_path / "data"), n=10, shard_size=10)
    ck = save_checkpoint(tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="inside the input"):
        score(ScoreConfig(data=str(tmp_path / "data"), metrics=("loss",), out=str(tmp_path / "data" / "s"), model=TINY,
                          checkpoint=str(ck)))
    out = tmp_path / "s"
    os.makedirs(out)
    (out / "part-00000-user.parquet").write_bytes(b"mine")
    score(ScoreConfig(data=str(tmp_path / "data"), metrics=("loss",), out=str(out), model=TINY, checkpoint=str(ck), workers=0,
                      overwrite=True))
    assert (out / "part-00000-user.parquet").read_bytes() == b"mine"


def test_a_run_that_failed_before_any_part_does_not_lock_its_output(tmp_path):
    make_demo(str(tmp_path / "data"), n=10, shard_size=10)
    with pytest.raises(ConfigError):
        score(ScoreConfig(data=str(tmp_path / "data"), metrics=("prototypes",), out=str(tmp_path / "s"), model=TINY,
                          checkpoint=str(tmp_path / "missing.safetensors")))
    ck = save_checkpoint(tmp_path / "m.safetensors")
    score(ScoreConfig(data=str(tmp_path / "data"), metrics=("loss",), out=str(tmp_path / "s"), model=TINY, checkpoint=str(ck), workers=0))
    r = score(ScoreConfig(data=str(tmp_path / "data"), metrics=("entropy",), out=str(tmp_path / "s"), model=TINY, checkpoint=str(ck),
                          workers=0, overwrite=True))
    assert r["scored"] == 10


def test_spearman_uses_average_ranks_for_ties():
    from dataprune.ranks import spearman

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 2000), rng.integers(0, 2, 2000)
    assert abs(spearman(a, b)) < 0.1  # independent tied data: no spurious agreement
    assert spearman(np.arange(10), np.arange(10) * 3) == pytest.approx(1.0)


def test_unlabelled_rows_keep_label_free_scores_in_mixed_runs(tmp_path):
    from dataprune import tario

    d = tmp_path / "data"
    make_demo(str(d), n=20, shard_size=20)
    from dataprune.sources import open_source

    src = open_source(str(d))
    src_img = next(src.iter_samples(src.list_shards()[0])).image
    body = b"".join([tario.member_header("nolabel.jpg", len(src_img)), src_img, tario.padding(len(src_img))])
    (d / "demo-000001.tar").write_bytes(body + tario.end_of_archive(len(body)))
    ck = save_checkpoint(tmp_path / "m.safetensors")
    score(ScoreConfig(data=str(d), metrics=("loss", "entropy"), out=str(tmp_path / "a"), model=TINY, checkpoint=str(ck), workers=0))
    t = pd.read_parquet(tmp_path / "a").set_index("key")
    assert t.loc["nolabel", "status"] == "ok" and np.isnan(t.loc["nolabel", "loss"]) and np.isfinite(t.loc["nolabel", "entropy"])
    score(ScoreConfig(data=str(d), metrics=("loss",), out=str(tmp_path / "b"), model=TINY, checkpoint=str(ck), workers=0))
    t = pd.read_parquet(tmp_path / "b").set_index("key")
    assert t.loc["nolabel", "status"] == "no_label" and "demo-000001.tar" in t.loc["nolabel", "error"]


@pytest.mark.parametrize("cpus,threads,cuda,want", [
    (2, 2, False, 0),  # measured: the model's two threads use both cores; a worker would preempt one
    (4, 4, False, 0),
    (16, 16, False, 2),
    (16, 12, False, 4),  # cores the model's threads leave free decode
    (16, 16, True, 8),
    (1, 1, True, 1),
])
def test_auto_workers(monkeypatch, cpus, threads, cuda, want):
    from dataprune.engine import planning as engine_plan

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(engine_plan, "usable_cpus", lambda: cpus)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert engine_plan.auto_workers(cuda) == want


def test_auto_workers_share_the_node_between_torchrun_ranks(monkeypatch):
    from dataprune.engine import planning as engine_plan

    monkeypatch.setattr(engine_plan, "usable_cpus", lambda: 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # torchrun sets OMP_NUM_THREADS=1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert engine_plan.auto_workers(True) == 7  # 8 cores per GPU rank, one left for the rank itself
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(engine_plan, "usable_cpus", lambda: 2)
    assert engine_plan.auto_workers(False) == 0  # one core per CPU rank: decode in the rank itself


def test_unset_workers_resolve_to_a_number_stored_with_a_training_run(tmp_path, monkeypatch):
    import json

    from dataprune.engine import planning as engine_plan

    make_demo(str(tmp_path / "data"), n=24, shard_size=12, image_size=16)
    cfg = ScoreConfig(data=str(tmp_path / "data"), metrics=("el2n",), out=str(tmp_path / "s"), model=TINY, epochs=1, batch_size=8,
                      device="cpu")
    score(cfg)
    with open(tmp_path / "s" / "_dataprune.json") as f:
        meta = json.load(f)
    assert meta["config"]["workers"] == engine_plan.auto_workers(False)
    # requeued on a machine where the automatic count differs: resumes with the recorded count
    monkeypatch.setattr(engine_plan, "auto_workers", lambda cuda: meta["config"]["workers"] + 3)
    assert score(cfg)["shards_done_before"] == 2
    with pytest.raises(ConfigError, match="other parameters"):  # an explicit other count is another job
        score(ScoreConfig(**{**cfg.__dict__, "workers": meta["config"]["workers"] + 1}))


def test_worker_processes_give_the_same_table_as_the_main_process(tmp_path):
    make_demo(str(tmp_path / "data"), n=60, shard_size=20)
    ck = save_checkpoint(tmp_path / "m.safetensors")
    for w in (0, 2):
        score(ScoreConfig(data=str(tmp_path / "data"), metrics=("loss", "margin"), out=str(tmp_path / f"w{w}"), model=TINY,
                          checkpoint=str(ck), workers=w, batch_size=8))
    a, b = _table(tmp_path / "w0"), _table(tmp_path / "w2")
    assert len(a) == 60 and a["status"].eq("ok").all()
    pd.testing.assert_frame_equal(a, b)


def test_torchrun_two_cpu_ranks_train_one_proxy_together(tmp_path):
    """Training metrics under torchrun: the ranks train one model with DDP (each on the shards it then
    scores). Proof of synchronisation: el2n from the run equals el2n scored afterwards, in one
    process, with the proxy that rank 0 exported — for rank 1's shards too. The ranks get uneven
    batch counts (310 samples: 180 vs 130), and a run stopped after an epoch resumes to the same table."""
    import json

    make_demo(str(tmp_path / "data"), n=310, shard_size=60, image_size=16, label_noise=0.1)
    args = ["score", str(tmp_path / "data"), "--metric", "el2n,forgetting,aum", "--epochs", "3", "--model", TINY,
            "--workers", "0", "--batch-size", "8", "--lr", "0.05"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518", "-m", "dataprune.cli"]
    p = subprocess.run(torchrun + args + ["--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    two = _table(tmp_path / "two")
    assert len(two) == 310 and two["status"].eq("ok").all()
    for c in ("el2n", "forgetting", "aum"):
        assert two[c].notna().all(), c  # every row has training statistics, whichever rank trained on it
    assert not (tmp_path / "two" / ".train").exists()  # a complete run removes its checkpoints
    meta = json.loads((tmp_path / "two" / "_dataprune.json").read_text())
    assert meta["config"]["world_size"] == 2
    r = run_cli("score", tmp_path / "data", "--metric", "el2n", "--epochs", "0", "--model", TINY, "--workers", "0",
                "--checkpoint", tmp_path / "two" / "_proxy-run0.safetensors", "--out", tmp_path / "check")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(two["el2n"].to_numpy(), _table(tmp_path / "check")["el2n"].to_numpy(), rtol=1e-4, atol=1e-5)

    # stopped (SIGTERM to torchrun) once the first epoch's checkpoint exists, then resumed
    proc = subprocess.Popen(torchrun + args + ["--out", str(tmp_path / "stopped")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    ck = tmp_path / "stopped" / ".train" / "run-0.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ck.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    epoch = torch.load(ck, weights_only=True)["epoch"]
    assert 1 <= epoch < 3, "the run should be stopped during training"
    p = subprocess.run(torchrun + args + ["--out", str(tmp_path / "stopped")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming after epoch {epoch}" in p.stderr
    pd.testing.assert_frame_equal(two, _table(tmp_path / "stopped"))


SPAWNED = """
import multiprocessing as mp, sys
if __name__ == "__main__":
    mp.set_start_method("spawn")  # macOS's default; forkserver is Linux's from Python 3.14
    from dataprune.demo import make_demo
    from dataprune.engine import ScoreConfig, score
    d = sys.argv[1]
    make_demo(d + "/data", n=24, shard_size=12, image_size=16)
    r = score(ScoreConfig(data=d + "/data", metrics=("el2n",), out=d + "/s", model="test_resnet", epochs=1, batch_size=8,
                          workers=1, device="cpu"))
    print("scored", r["scored"])
"""


def test_decode_workers_start_with_spawn(tmp_path):
    """Worker processes that re-import the package (spawn/forkserver) can unpickle the datasets they get."""
    script = tmp_path / "spawned.py"
    script.write_text(SPAWNED)
    p = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "scored 24" in p.stdout
