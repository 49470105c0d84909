#!/usr/bin/env bash
# Reproduce the paper's pruning behaviour on real CIFAR-10 with dataprune, on a CPU.
#   bash examples/cifar10/run.sh /path/to/cifar10 [WORKDIR]
# DATA holds train-00000{0..9}.tar, test-00000{0..1}.tar and classes.txt (WebDataset, .jpg + .cls).
# Scale knobs (environment): MODEL (test_resnet), SCORE_EPOCHS (8), CURVE_EPOCHS (5 at fraction 1.0;
# fraction f trains CURVE_EPOCHS / f epochs so every point gets the same optimisation steps),
# FRACS, KEEPS, WORKERS (1), SMALL=1 (2 train shards, 1 test shard, 1 epoch: a smoke test).
set -euo pipefail
DATA=$(cd "${1:?usage: run.sh DATA [WORKDIR]}" && pwd)
W=${2:-cifar10-run}
MODEL=${MODEL:-test_resnet}
SCORE_EPOCHS=${SCORE_EPOCHS:-8}
CURVE_EPOCHS=${CURVE_EPOCHS:-5}
FRACS=${FRACS:-1.0,0.8,0.6,0.4,0.2,0.1}
KEEPS=${KEEPS:-hard,easy,random,ccs}
WORKERS=${WORKERS:-1}
TRAIN="$DATA/train-{000000..000009}.tar"
TEST="$DATA/test-{000000..000001}.tar"
if [ "${SMALL:-0}" = 1 ]; then
  TRAIN="$DATA/train-{000000..000001}.tar"; TEST="$DATA/test-000000.tar"; SCORE_EPOCHS=1; CURVE_EPOCHS=1
fi
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$W"
start=$(date +%s)
common=(--model "$MODEL" --workers "$WORKERS" --batch-size 128)

# 1. scores: training dynamics + the prototype metric on the proxy's own features
dataprune score "$TRAIN" --metric el2n,forgetting,aum,prototypes --epochs "$SCORE_EPOCHS" --lr 0.05 "${common[@]}" \
  --out "$W/scores"
t_scores=$(date +%s)

# 2. pruning curves (keep hard / easy / random / CCS) by EL2N
dataprune curve "$TRAIN" --scores "$W/scores" --by el2n --test "$TEST" --fracs "$FRACS" --keep "$KEEPS" \
  --epochs "$CURVE_EPOCHS" --lr 0.05 "${common[@]}" --out "$W/curve"
t_curve=$(date +%s)

# 3. label noise: flip 10 % of the training labels, score again, precision of the hardest 10 %
NOISY="$W/noisy-data"
if [ "${SMALL:-0}" = 1 ]; then PAT='train-00000[01].tar'; else PAT='train-*.tar'; fi
[ -f "$NOISY/flipped.tsv" ] || python3 "$HERE/flip_labels.py" "$DATA" "$NOISY" --frac 0.1 --seed 0 --pattern "$PAT"
dataprune score "$NOISY" --metric el2n,forgetting,aum,prototypes --epochs "$SCORE_EPOCHS" --lr 0.05 "${common[@]}" \
  --out "$W/noisy-scores"
t_noise=$(date +%s)

# 4. seed noise: the full-data and 0.8 cells of keep hard and random again with another seed
dataprune curve "$TRAIN" --scores "$W/scores" --by el2n --test "$TEST" --fracs 1.0,0.8 --keep hard,random \
  --epochs "$CURVE_EPOCHS" --lr 0.05 --seed 1 "${common[@]}" --out "$W/curve-seed1"
t_seed=$(date +%s)

python3 "$HERE/analyze.py" "$W/scores" --noisy "$W/noisy-scores" --flipped "$NOISY/flipped.tsv" --json "$W/analysis.json"
echo "seconds: scores $((t_scores - start)), curve $((t_curve - t_scores)), label noise $((t_noise - t_curve)), seed noise $((t_seed - t_noise)), total $(( $(date +%s) - start ))" \
  | tee "$W/timing.txt"
python3 "$HERE/report.py" "$W" | tee "$W/report.md"  # the tables of RESULTS.md

# 5. the HTML report: distributions, hardest/easiest images per class, label-noise suspects, the curve
dataprune report "$W/scores" --curve "$W/curve" --out "$W/report"
