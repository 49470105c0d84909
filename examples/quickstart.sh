#!/usr/bin/env bash
# Quickstart on the built-in demo dataset: generate it, inspect it, then run the pipeline.
# Usage: bash examples/quickstart.sh [WORKDIR]   (default: ./quickstart)
set -euo pipefail
W=${1:-quickstart}
mkdir -p "$W"
cd "$W"
dataprune demo data --samples 1000 --shard-size 250
dataprune info data --check
dataprune manifest data --out dataprune-out/manifest.parquet
dataprune export --to wds --out dataprune-out/export --shard-size 400
python - <<'PY'
import webdataset as wds
n = sum(1 for _ in wds.WebDataset("dataprune-out/export/pruned-{000000..000002}.tar", shardshuffle=False))
print(f"webdataset reads back {n} samples from dataprune-out/export/")
PY
