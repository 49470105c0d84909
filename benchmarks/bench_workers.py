"""Decode in the main process or in DataLoader workers? Proxy training time per --workers count.

    python benchmarks/bench_workers.py ../shared/data/cifar10 [--model test_resnet] [--shards 2] [--repeats 5] [--workers 0,1]

Trains the proxy for one epoch (`dataprune score --metric el2n --epochs 1`, CPU) on the first
``--shards`` CIFAR-10 train shards with each worker count in turn, alternating so that the machine's
drift hits every count alike, after one warm-up run. Prints the median seconds per count, their
range, and each count's time relative to the default (`engine.planning.auto_workers`). The scoring-only side
of the same question is in bench_score.py (--compare-workers).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from _util import median  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", help="directory with train-*.tar (e.g. ../shared/data/cifar10)")
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", default="0,1", help="worker counts to compare")
    ap.add_argument("--batch-size", type=int, default=128)
    a = ap.parse_args()

    import torch

    from dataprune.engine import ScoreConfig, auto_workers, score

    shards = sorted(glob.glob(os.path.join(a.data, "train-*.tar")))[: a.shards]
    tmp = tempfile.mkdtemp(prefix="bench-workers-")
    subset = os.path.join(tmp, "shards.txt")
    with open(subset, "w") as f:
        f.write("\n".join(os.path.abspath(s) for s in shards) + "\n")
    counts = [int(w) for w in a.workers.split(",") if w.strip()]
    default = auto_workers(False)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; {len(shards)} shards; "
          f"model {a.model}; default --workers here: {default}")

    def run(w: int, tag: str) -> float:
        t = time.perf_counter()
        score(ScoreConfig(data=subset, metrics=("el2n",), out=os.path.join(tmp, tag), model=a.model, epochs=1,
                          batch_size=a.batch_size, workers=w, device="cpu"))
        return time.perf_counter() - t

    run(counts[0], "warm-up")
    secs: dict[int, list[float]] = {w: [] for w in counts}
    for r in range(a.repeats):
        for w in counts:
            secs[w].append(run(w, f"w{w}-{r}"))
            print(f"  run {r + 1}/{a.repeats} --workers {w}: {secs[w][-1]:.1f}s", flush=True)
    ref = median(secs[default]) if default in secs else None
    for w in counts:
        m = median(secs[w])
        rel = f" → {m / ref:.2f} × the default's time" if ref else ""
        print(f"--workers {w}{' (default)' if w == default else ''}: {m:.1f}s median (range {min(secs[w]):.1f}–{max(secs[w]):.1f}){rel}")


if __name__ == "__main__":
    main()
