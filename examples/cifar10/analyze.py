"""Summaries for RESULTS.md: metric correlations, and how well each metric finds flipped labels.

    python examples/cifar10/analyze.py SCORES [--noisy NOISY_SCORES --flipped FLIPPED_TSV] [--json OUT]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd

from dataprune.ranks import spearman

METRICS = ("el2n", "forgetting", "aum", "prototypes")


def correlations(t: pd.DataFrame) -> dict:
    cols = [m for m in METRICS if m in t.columns]
    ok = t[cols].notna().all(axis=1)
    return {f"{a}~{b}": round(spearman(t.loc[ok, a].to_numpy(), t.loc[ok, b].to_numpy()), 4)
            for i, a in enumerate(cols) for b in cols[i + 1 :]}


def noise_precision(t: pd.DataFrame, flipped: set) -> dict:
    is_flip = np.array([(s, k) in flipped for s, k in zip(t["shard"].astype(str), t["key"])])
    out = {"flipped": int(is_flip.sum()), "rows": len(t)}
    n = max(1, int(round(0.1 * len(t))))
    for m in METRICS:
        if m in t.columns:
            order = np.argsort(-t[m].fillna(-np.inf).to_numpy(), kind="stable")[:n]
            out[f"precision@10%_{m}"] = round(float(is_flip[order].mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scores")
    ap.add_argument("--noisy")
    ap.add_argument("--flipped")
    ap.add_argument("--json")
    a = ap.parse_args()
    res = {"spearman": correlations(pd.read_parquet(a.scores))}
    if a.noisy and a.flipped:
        flips = pd.read_csv(a.flipped, sep="\t", header=None, names=["shard", "key", "old", "new"], dtype=str)
        res["label_noise"] = noise_precision(pd.read_parquet(a.noisy), set(zip(flips["shard"], flips["key"])))
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
