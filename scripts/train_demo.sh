#!/usr/bin/env bash
# The exact commands that produced the demo model in rwkvkit/assets/ (see configs/demo.yaml).
# On a 2-core machine shared with other jobs this takes ~45 minutes; it stops on time (max_minutes)
# and saves a checkpoint every 100 steps, so a usable model exists whenever it is interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# 1. corpus -> 8192-token subset of the World vocabulary + flat uint16 token file (a few seconds)
$PY -m rwkvkit.train.vocab runs/demo_data --vocab-size 8192

# 2. train Finch L6 C256 (ctx 128, 8 x 128 tokens per step, 45 minutes of wall clock at most)
nice -n 10 $PY -m rwkvkit.train.cli --config configs/demo.yaml "$@"

# 3. ship the final checkpoint (official .pth layout, bf16) and its vocabulary
cp runs/demo/rwkv-final.pth rwkvkit/assets/demo-finch-L6-C256.pth
cp runs/demo_data/vocab.txt rwkvkit/assets/demo-vocab.txt
cp runs/demo/metrics.jsonl rwkvkit/assets/demo-metrics.jsonl
cp runs/demo/loss.png rwkvkit/assets/demo-loss.png
