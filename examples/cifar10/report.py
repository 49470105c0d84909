"""The tables of RESULTS.md, computed from a finished run of run.sh (nothing is typed in by hand).

    python examples/cifar10/report.py WORKDIR      # markdown on stdout

Reads WORKDIR/curve/curve.csv (from `dataprune curve`), WORKDIR/curve-seed1/curve.csv (the same
cells with another seed, for the noise estimate) and WORKDIR/analysis.json (from analyze.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
from collections import defaultdict


def load_curve(path: str) -> dict[tuple[str, float], list[dict]]:
    runs: dict[tuple[str, float], list[dict]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            runs[(row["strategy"], float(row["fraction"]))].append(row)
    return runs


def err(runs, k: str, f: float) -> float | None:
    rows = runs.get((k, f))
    return None if not rows else 100 * sum(float(r["test_error"]) for r in rows) / len(rows)


def binomial_se(e_pct: float, n: int) -> float:
    p = e_pct / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    a = ap.parse_args()
    runs = load_curve(os.path.join(a.workdir, "curve", "curve.csv"))
    keeps = [k for k in ("hard", "easy", "random", "ccs") if any(s == k for s, _ in runs)]
    fracs = sorted({f for _, f in runs}, reverse=True)
    n_test = int(next(iter(runs.values()))[0]["test_samples"])
    names = {"hard": "keep hard", "easy": "keep easy", "random": "random", "ccs": "CCS"}

    print("| fraction kept | samples | epochs | " + " | ".join(names[k] for k in keeps) + " |")
    print("|---:|---:|---:|" + "---:|" * len(keeps))
    for f in fracs:
        any_row = next(runs[(k, f)][0] for k in keeps if (k, f) in runs)
        cells = []
        for k in keeps:
            e = err(runs, k, f)
            cells.append("–" if e is None else f"{e:.2f}")
        print(f"| {f:g} | {any_row['kept']} | {any_row['epochs']} | " + " | ".join(cells) + " |")
    full = err(runs, "hard", 1.0)
    e_ref = full if full is not None else 100 * sum(float(r["test_error"]) for rows in runs.values() for r in rows) / sum(map(len, runs.values()))
    at_full = next((rows for (_, f), rows in runs.items() if f == 1.0), [])  # one training per repeat serves every strategy
    total_train = sum(float(r["train_seconds"]) for (_, f), rows in runs.items() if f < 1.0 for r in rows) + sum(
        float(r["train_seconds"]) for r in at_full)
    se = binomial_se(e_ref, n_test)
    print(f"\nTest error in %, {n_test} test images, one training per cell. Sampling noise of one cell "
          f"(binomial standard error at {e_ref:.0f} % error): ±{se:.2f} points; the difference of two cells: "
          f"±{math.sqrt(2) * se:.2f}. Training time of all curve points: {total_train / 60:.0f} min.\n")

    checks = []
    if full is not None and err(runs, "hard", 0.8) is not None:
        h8, r8 = err(runs, "hard", 0.8), err(runs, "random", 0.8)
        checks.append(f"- (a) at 0.8 kept: keep hard {h8:.2f} vs full data {full:.2f} → {h8 - full:+.2f} points"
                      + (f"; vs random {r8:.2f} → {h8 - r8:+.2f}" if r8 is not None else ""))
    if err(runs, "hard", 0.1) is not None:
        h1, r1, c1, e1 = (err(runs, k, 0.1) for k in ("hard", "random", "ccs", "easy"))
        line = f"- (b) at 0.1 kept: keep hard {h1:.2f}"
        if r1 is not None:
            line += f" vs random {r1:.2f} → {h1 - r1:+.2f}"
        if c1 is not None and r1 is not None:
            line += f"; CCS {c1:.2f} vs random → {c1 - r1:+.2f}"
        if e1 is not None:
            line += f"; keep easy {e1:.2f}"
        checks.append(line)
    print("\n".join(checks))

    seed1 = os.path.join(a.workdir, "curve-seed1", "curve.csv")
    if os.path.exists(seed1):  # the same cells trained again with --seed 1: how far apart two trainings land
        other = load_curve(seed1)
        diffs = []
        print("\n| cell | seed 0 | seed 1 | difference |\n|---|---:|---:|---:|")
        for (k, f) in sorted(other, key=lambda kf: (-kf[1], kf[0])):
            if k != "hard" and f == 1.0:
                continue  # one shared training at 1.0
            e0, e1 = err(runs, k, f), err(other, k, f)
            if e0 is not None and e1 is not None:
                diffs.append(abs(e1 - e0))
                print(f"| {names[k] if f < 1 else 'full data'} {f:g} | {e0:.2f} | {e1:.2f} | {e1 - e0:+.2f} |")
        if diffs:
            sd = math.sqrt(sum(d * d for d in diffs) / (2 * len(diffs)))
            print(f"\nSeed-to-seed standard deviation of one cell, estimated from these pairs: {sd:.2f} points "
                  f"(so two cells differ by noise alone by about ±{math.sqrt(2) * sd:.2f}).")

    path = os.path.join(a.workdir, "analysis.json")
    if os.path.exists(path):
        with open(path) as f:
            an = json.load(f)
        print("\n| metrics | Spearman ρ |\n|---|---:|")
        for pair, rho in sorted(an.get("spearman", {}).items(), key=lambda kv: -kv[1]):
            print(f"| {pair.replace('~', ' ~ ')} | {rho:.2f} |")
        ln = an.get("label_noise")
        if ln:
            print(f"\nLabel noise: {ln['flipped']} of {ln['rows']} training labels flipped; precision of the hardest 10 % "
                  f"at finding them (chance = {ln['flipped'] / ln['rows']:.2f}):\n")
            print("| metric | precision@10 % |\n|---|---:|")
            for k, v in ln.items():
                if k.startswith("precision@10%_"):
                    print(f"| {k.split('_', 1)[1]} | {v:.3f} |")


if __name__ == "__main__":
    main()
