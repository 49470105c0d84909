"""`dataprune report`: the page built from real and generated score tables, bad input as notes, and
the page opened in a real browser (headless chromium through chromedriver): no console error, every
image decoded, no request outside the report folder, planted label noise shown first."""

from __future__ import annotations

import json
import os
import re
import sys
import subprocess
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprune import scoretable, tables
from dataprune.config import ReportConfig, ScoreConfig
from dataprune.demo import make_demo
from dataprune.report import build_report

TINY = "test_resnet"  # timm's 0.4M-parameter test network
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """A planted-mislabel demo dataset (10 % of labels flipped) scored with el2n, forgetting and aum by a
    tiny real training run."""
    from dataprune.engine import score

    d = tmp_path_factory.mktemp("report")
    make_demo(str(d / "data"), n=600, shard_size=200, label_noise=0.1, seed=3)
    flipped = set((d / "data" / "flipped.txt").read_text().split())
    cfg = ScoreConfig(data=str(d / "data"), metrics=("el2n", "forgetting", "aum"), out=str(d / "scores"),
                      model=TINY, epochs=6, batch_size=64, workers=0, lr=0.05, seed=0)
    score(cfg)
    return d, flipped


def _write_table(out, cols: dict, meta_extra: dict | None = None, source=None, classes=None, metrics=None):
    """A score table from columns (base columns filled in), in one part."""
    n = len(cols["key"])
    base = {"sample_id": np.arange(1, n + 1, dtype=np.uint64), "shard": ["s.tar"] * n, "label": [i % 3 for i in range(n)],
            "loc_path": ["/nowhere/s.tar"] * n, "loc_offset": [512 * i for i in range(n)], "loc_size": [1024] * n,
            "status": ["ok"] * n, "error": [None] * n}
    base.update(cols)
    schema = {f.name: f.type for f in tables.BASE_FIELDS}
    arrays = {k: pa.array(v, schema.get(k)) for k, v in base.items()}
    scoretable.write_part(str(out), 0, pa.table(arrays), {"seen": n})
    flags = ("pred_label", "pred_prob", "dup_group", "dup_max_sim", "is_duplicate")
    declared = metrics or {c: {"metric": c, "range": [0.0, 10.0]} for c in cols if c not in schema and c not in flags}
    meta = scoretable.score_table_meta(source or {"format": "wds", "path": "/nowhere/data", "options": {}}, classes,
                                       ["s.tar"], declared, **(meta_extra or {}))
    scoretable.write_table_meta(str(out), meta)
    return str(out)


def _section(page: str, anchor: str) -> str:
    i = page.index(f'id="{anchor}"')
    return page[i:page.index("</section>", i)]


def _keys(fragment: str) -> list[str]:
    return re.findall(r"<figcaption>([^<]+)<br>", fragment)


# ------------------------------------------------------------------------------ built from real scores

def test_score_stores_the_proxys_prediction_beside_its_scores(noisy, tmp_path):
    """A trained proxy's argmax and its probability are columns of the table; the planted flips are
    mostly rows where the prediction disagrees with the label, and select never takes them for a score."""
    d, flipped = noisy
    t = pq.read_table(str(d / "scores" / "parts")).sort_by("key")
    assert t.schema.field("pred_label").type == pa.int32() and t.schema.field("pred_prob").type == pa.float32()
    ok = np.array(t.column("status").to_pylist()) == "ok"
    pred, prob = t.column("pred_label").to_numpy(zero_copy_only=False), t.column("pred_prob").to_numpy()
    assert t.column("pred_label").null_count == int((~ok).sum())
    assert np.all((prob[ok] > 0.1 - 1e-6) & (prob[ok] <= 1 + 1e-6))  # ≥ 1/classes: the top of a softmax
    keys, labels = t.column("key").to_pylist(), t.column("label").to_numpy()
    wrong = {k for k, lbl, p, o in zip(keys, labels, pred, ok) if o and p != lbl}
    assert len(wrong & flipped) >= 0.6 * len(flipped)  # the proxy predicts the true class of most planted flips
    r = subprocess.run([sys.executable, "-m", "dataprune", "select", str(d / "scores"), "--by", "el2n", "--frac", "0.5",
                        "--dry-run", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    bad = subprocess.run([sys.executable, "-m", "dataprune", "select", str(d / "scores"), "--by", "pred_prob", "--frac", "0.5",
                          "--dry-run"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "pred_prob" in bad.stderr



def test_report_of_a_real_table_shows_planted_noise_first(noisy, tmp_path):
    d, flipped = noisy
    r = build_report(ReportConfig(scores=str(d / "scores"), out=str(tmp_path / "rep"), k=4))
    page = (tmp_path / "rep" / "index.html").read_text()
    assert r["metrics"] == ["el2n", "forgetting", "aum"]
    assert r["thumbnails"]["made"] == r["thumbnails"]["wanted"] > 0 and not r["notes"]
    for anchor in ("summary", "metric-0-el2n", "metric-1-forgetting", "metric-2-aum", "correlations", "label-noise"):
        assert f'id="{anchor}"' in page
    top = _keys(_section(page, "label-noise"))[:20]
    assert len(top) == 20 and sum(k in flipped for k in top) >= 14, top  # planted rows first
    hardest = _keys(_section(page, "metric-0-el2n"))
    assert len(hardest) == 10 * 4 * 2
    for rel in re.findall(r'src="([^"]+)"', page):  # every file the page names exists inside the report
        assert os.path.isfile(tmp_path / "rep" / rel), rel


def test_cli_report_with_manifest_and_curve(noisy, tmp_path, mk):
    d, _ = noisy
    m = tmp_path / "m.parquet"
    assert mk.cli_fast("select", d / "scores", "--by", "el2n", "--strategy", "ccs", "--frac", "0.5", "--out", m).returncode == 0
    (tmp_path / "curve").mkdir()
    (tmp_path / "curve" / "curve.csv").write_text("strategy,fraction,repeat,test_error\nhard,1.0,0,0.2\nhard,0.5,0,0.25\n"
                                                  "random,1.0,0,0.2\nrandom,0.5,0,0.3\n")
    r = mk.cli_fast("report", d / "scores", "--manifest", m, "--curve", tmp_path / "curve", "--by", "el2n",
                          "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stdout
    assert "index.html" in r.stdout
    page = (tmp_path / "rep" / "index.html").read_text()
    sel = _section(page, "selection")
    assert "CCS strata" in sel and "kept" in sel and "dropped" in sel
    assert 'id="curve"' in page and os.path.isfile(tmp_path / "rep" / "plots" / "curve.png")
    assert 'id="metric-1-forgetting"' not in page  # --by limits the metric sections


def test_out_that_is_a_file_is_exit_2(noisy, tmp_path, mk):
    d, _ = noisy
    (tmp_path / "f").write_text("x")
    assert mk.cli_fast("report", d / "scores", "--out", tmp_path / "f").returncode == 2
    assert (tmp_path / "f").read_text() == "x"
    assert mk.cli_fast("report", d / "scores", "--by", "nope", "--out", tmp_path / "r").returncode == 2


# ------------------------------------------------------------------------------ bad input: notes, not crashes

def test_no_labels_all_nan_and_unreachable_dataset_are_notes(tmp_path):
    n = 30
    out = _write_table(tmp_path / "s", {"key": [f"k{i}" for i in range(n)], "label": [None] * n,
                                        "el2n": np.linspace(0, 1, n).astype(np.float32),
                                        "loss": np.full(n, np.nan, np.float32)})
    r = build_report(ReportConfig(scores=out, out=str(tmp_path / "rep")))
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "no labels" in page and "all NaN" in page and "not reachable" in page
    assert r["thumbnails"]["made"] == 0 and r["thumbnails"]["wanted"] > 0
    assert set(re.findall(r'<img src="([^"]+)"', page)) == {"assets/missing.png"}


def test_untrusted_strings_are_escaped_and_locations_stay_inside_the_dataset(tmp_path):
    data = tmp_path / "data"
    make_demo(str(data), n=20, shard_size=20, seed=1)
    secret = tmp_path / "secret.tar"
    shutil.copy(data / "train-000000.tar" if (data / "train-000000.tar").exists() else next(data.glob("*.tar")), secret)
    shard = next(data.glob("*.tar"))
    n = 6
    evil = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    out = _write_table(tmp_path / "s", {"key": [evil] + [f"k{i}" for i in range(1, n)], "el2n": np.arange(n, dtype=np.float32),
                                        "loc_path": [str(secret)] * n, "loc_offset": [0] * n},
                       source={"format": "wds", "path": str(data), "options": {}}, classes=[evil, "b", "c"])
    r = build_report(ReportConfig(scores=out, out=str(tmp_path / "rep")))
    page = (tmp_path / "rep" / "index.html").read_text()
    assert "<script>" not in page and "onerror=alert" not in page.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;" in page
    assert r["thumbnails"]["made"] == 0 and "outside_root" in json.dumps(r["thumbnails"]["failed"])
    assert shard.exists()


def test_proxy_predictions_beside_suspects(tmp_path):
    n = 12
    out = _write_table(tmp_path / "s", {"key": [f"k{i}" for i in range(n)], "forgetting": np.arange(n, dtype=np.float32),
                                        "pred_label": np.array([(i + (i > 8)) % 3 for i in range(n)], np.int32),
                                        "pred_prob": np.linspace(0.4, 0.99, n).astype(np.float32)}, classes=["cat", "dog", "eel"])
    r = build_report(ReportConfig(scores=out, out=str(tmp_path / "rep"), suspects=5))
    noise = _section((tmp_path / "rep" / "index.html").read_text(), "label-noise")
    assert r["metrics"] == ["forgetting"]  # prediction columns are not metrics
    assert _keys(noise) == ["k11", "k10", "k9", "k8", "k7"]
    assert "pred cat (0.99)" in noise and noise.count('class="th sus"') == 3
    assert "disagrees with the assigned label on 3 of these 5 rows" in noise


def test_duplicates_section_from_dedup_columns(tmp_path):
    n = 9
    out = _write_table(tmp_path / "s", {"key": [f"k{i}" for i in range(n)], "el2n": np.arange(n, dtype=np.float32),
                                        "dup_group": np.array([0, 0, 1, 1, 1, -1, -1, -1, -1], np.int64),
                                        "dup_max_sim": np.array([.99, .99, .97, .96, .97, np.nan, np.nan, np.nan, np.nan], np.float32),
                                        "is_duplicate": [True, False, False, True, True, False, False, False, False]},
                       metrics={"el2n": {"metric": "el2n", "range": [0, 2]},
                                "dedup": {"metric": "dedup", "columns": ["dup_group", "dup_max_sim", "is_duplicate"],
                                          "direction": "is_duplicate = True marks redundant rows"}})
    build_report(ReportConfig(scores=out, out=str(tmp_path / "rep")))
    dup = _section((tmp_path / "rep" / "index.html").read_text(), "duplicates")
    assert "2 duplicate groups holding 5 rows; 3 of them are marked redundant" in dup
    assert dup.count('class="th kept"') == 2 and "sim 0.990" in dup


# ------------------------------------------------------------------------------ a real browser

def _chrome(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (apt-get install chromium chromium-driver)")
def test_report_in_a_real_browser(noisy, tmp_path, mk):
    from selenium.webdriver.common.by import By

    d, flipped = noisy
    m = tmp_path / "m.parquet"
    assert mk.cli_fast("select", d / "scores", "--by", "el2n", "--frac", "0.7", "--class-balanced", "--out", m).returncode == 0
    rep = tmp_path / "rep"
    build_report(ReportConfig(scores=str(d / "scores"), out=str(rep), manifest=str(m), k=4))
    folder = "file://" + str(rep.resolve()) + "/"
    driver = _chrome(tmp_path)
    try:
        driver.get_log("performance")  # what the browser itself loaded at start (its new-tab page) is not the report's
        driver.get(folder + "index.html")
        assert driver.execute_script("return document.readyState") == "complete"
        imgs = driver.execute_script("return Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete, i.naturalWidth])")
        assert len(imgs) > 100
        bad = [i for i in imgs if not (i[1] and i[2] > 0)]
        assert not bad, bad[:5]
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        requested = [e for e in resources] + [i[0] for i in imgs]
        for entry in driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent" and not msg["params"].get("documentURL", "").startswith("chrome://"):
                requested.append(msg["params"]["request"]["url"])  # (chrome:// documents: the browser's own pages)
        outside = [u for u in requested if not u.startswith(folder)]
        assert not outside, outside[:5]
        errors = [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
        assert not errors, errors
        noise = driver.find_element(By.ID, "label-noise")
        captions = [c.text.split("\n")[0] for c in noise.find_elements(By.TAG_NAME, "figcaption")][:20]
        assert sum(k in flipped for k in captions) >= 14, captions
        shots = tmp_path / "screenshots"
        shots.mkdir()
        for sec in driver.find_elements(By.TAG_NAME, "section"):
            driver.execute_script("arguments[0].scrollIntoView()", sec)
            sec.screenshot(str(shots / f"{sec.get_attribute('id')}.png"))
        assert {"summary", "label-noise", "selection"} <= {p.stem for p in shots.iterdir()}
    finally:
        driver.quit()
