"""Copy WebDataset shards, flipping a seeded fraction of the labels (for the label-noise check).

    python examples/cifar10/flip_labels.py DATA OUT [--frac 0.1] [--seed 0] [--pattern 'train-*.tar']

Every member is copied byte for byte except the ``.cls`` of flipped samples, which gets a different
class drawn uniformly. ``OUT/flipped.tsv`` lists ``shard<TAB>key<TAB>old<TAB>new`` of every flip.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

from dataprune import tario
from dataprune.ids import unit_random
from dataprune.sources import open_source
from dataprune.tables import atomic_write_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pattern", default="train-*.tar")
    a = ap.parse_args()
    shards = sorted(glob.glob(os.path.join(a.data, a.pattern)))
    if not shards:
        raise SystemExit(f"{a.data}: no {a.pattern}")
    classes_txt = os.path.join(a.data, "classes.txt")
    classes = open(classes_txt).read().split() if os.path.exists(classes_txt) else None
    k = len(classes) if classes else 10
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    lines = []
    for path in shards:
        src = open_source(path)
        chunks = []
        for s in src.iter_samples(src.list_shards()[0]):
            members = dict(s.members)
            if s.ok and s.label is not None and unit_random(np.array([s.sample_id], np.uint64), a.seed)[0] < a.frac:
                new = int((s.label + rng.integers(1, k)) % k)
                members["cls"] = str(new).encode()
                lines.append(f"{s.shard}\t{s.key}\t{s.label}\t{new}")
            for ext, data in members.items():
                chunks += [tario.member_header(f"{s.key}.{ext}", len(data)), data, tario.padding(len(data))]
        body = b"".join(chunks)
        atomic_write_bytes(os.path.join(a.out, os.path.basename(path)), body + tario.end_of_archive(len(body)))
    if classes:
        atomic_write_bytes(os.path.join(a.out, "classes.txt"), ("\n".join(classes) + "\n").encode())
    atomic_write_bytes(os.path.join(a.out, "flipped.tsv"), ("\n".join(lines) + "\n").encode())
    print(f"wrote {len(shards)} shards to {a.out}, {len(lines)} labels flipped")


if __name__ == "__main__":
    main()
