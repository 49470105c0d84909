#!/usr/bin/env bash
# GPU JPEG decode checks on a machine with CUDA (total well under 5 min on one H200):
#   1. CPU/GPU decode parity on generated ImageNet-like photos (tolerance in gpu_check.py), batched GPU decode images/s;
#   2. `dataprune score --metric loss --epochs 0 --image-size 224 --model resnet50` images/s, --decode cuda vs cpu
#      (random-init resnet50 checkpoint: throughput does not depend on the weights; no download needed).
#     bash benchmarks/gpu_check.sh [N_IMAGES]      (default 2000)
set -euo pipefail
N=${1:-2000}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "load: $(cat /proc/loadavg); cores: $(nproc)"
timeout 180 python benchmarks/gpu_check.py "$TMP" --n "$N"  # also writes $TMP/imagenet and $TMP/resnet50.safetensors
for mode in cuda cpu cuda cpu; do
  timeout 120 python -m dataprune score "$TMP/imagenet" --metric loss --epochs 0 --image-size 224 --model resnet50 \
      --checkpoint "$TMP/resnet50.safetensors" --out "$TMP/scores-$mode" --overwrite --decode "$mode" --json > "$TMP/r.json"
  python - "$mode" "$TMP/r.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
secs = (r.get("phase_seconds") or {}).get("score", r["seconds"])
t = r["timings"]
print(f"score --decode {sys.argv[1]:4s}: {r['seen'] / secs:7.0f} images/s in the score phase ({r['seen']} images, {secs:.1f}s; "
      f"whole command {r['seconds']:.1f}s); wait for data {t['read']:.1f}s, compute {t['compute']:.1f}s; "
      f"decode paths {t.get('decode_paths')}")
PY
done
