"""Contract tests over the metric registry: register a metric and these run it through the engine."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dataprune.demo import make_demo
from dataprune.engine import ScoreConfig, score
from dataprune.metrics import METRICS, get_metric, list_metrics


IMAGE = [n for n in list_metrics() if get_metric(n).kind != "text"]  # text metrics: tests/test_text_dedup.py's contract


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("contract")
    make_demo(str(d / "data"), n=64, shard_size=32, seed=1)
    r = score(ScoreConfig(data=str(d / "data"), metrics=tuple(IMAGE), out=str(d / "s"), model="test_resnet", epochs=2,
                          batch_size=16, workers=0, grand_params="head"))
    meta = json.loads((d / "s" / "_dataprune.json").read_text())
    return r, pd.read_parquet(d / "s"), meta


def test_registry_is_not_empty_and_names_are_columns():
    assert {"el2n", "grand", "forgetting", "aum", "loss", "margin", "entropy"} <= set(METRICS)
    for name in list_metrics():
        m = get_metric(name)
        assert m.name == name and m.low <= m.high and m.kind and m.description


@pytest.mark.parametrize("name", IMAGE)
def test_every_metric_scores_every_sample_within_its_range(table, name):
    r, t, meta = table
    m = get_metric(name)
    assert r["scored"] == 64
    for col in m.score_columns:
        assert t[col].dtype == np.float32
        v = t[col].to_numpy()
        assert np.isfinite(v).all(), f"{name}: every ok sample gets a finite value"
        assert v.min() >= m.low - 1e-4 and v.max() <= m.high + 1e-4
        assert meta["metrics"][col]["direction"] == "higher = harder"
        assert meta["metrics"][col]["range"] == [m.low, m.high]
        assert meta["metrics"][col]["metric"] == name
    for col in m.extra_columns:
        assert col in t.columns and t[col].notna().all()


@pytest.mark.parametrize("name", [n for n in list_metrics() if get_metric(n).needs_labels and get_metric(n).kind in ("eval", "train")])
def test_label_metrics_rank_misclassified_samples_as_harder(table, name):
    """Higher = harder: samples the trained model finds hard (high loss) score above the others.
    (``init`` metrics such as grand look at the untrained model and are excluded.)"""
    _, t, _ = table
    if name == "loss":
        return
    hard = t["loss"] > t["loss"].median()
    for col in get_metric(name).score_columns:
        assert t.loc[hard, col].mean() >= t.loc[~hard, col].mean()
