#!/usr/bin/env bash
# Quickstart on the built-in demo dataset: generate it, score it, keep the hardest 80 %, export shards,
# read them back with webdataset.
# Usage: bash examples/quickstart.sh [WORKDIR]
#   WORKDIR defaults to a new temporary directory (printed at the start and the end); nothing is
#   written anywhere else. Takes about a minute on a laptop CPU.
set -euo pipefail
W=${1:-$(mktemp -d "${TMPDIR:-/tmp}/dataprune-quickstart.XXXXXX")}
mkdir -p "$W"
cd "$W"
echo "quickstart: working in $W"
dataprune demo data --samples 1000 --shard-size 250       # 10 classes of coloured shapes, WebDataset shards
dataprune info data --check                                # what is in it; decode every image
dataprune score data --metric el2n,forgetting --epochs 3   # proxy training + scores → dataprune-out/scores/
dataprune select --by el2n --keep hard --frac 0.8 --class-balanced   # → dataprune-out/manifest.parquet
dataprune export --to wds                                  # → dataprune-out/export/pruned-*.tar
python3 - <<'PY'
import glob
import webdataset as wds
shards = sorted(glob.glob("dataprune-out/export/pruned-*.tar"))
n = sum(1 for _ in wds.WebDataset(shards, shardshuffle=False))
print(f"webdataset reads back {n} samples from {len(shards)} shards in dataprune-out/export/")
PY
echo "quickstart: done; everything is in $W (delete it with: rm -rf '$W')"
