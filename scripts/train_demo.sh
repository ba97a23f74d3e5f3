#!/usr/bin/env bash
# The exact commands that produced the demo model in rwkvkit/assets/ (see configs/demo.yaml).
# On the 2-core machine it was made on (shared with other jobs) phase 1 took 26 minutes and
# phase 2 12 minutes (1.54M tokens in all; validation loss 3.72 nats/token). Both stop on time
# (max_minutes) if slower and save a checkpoint every 100 steps, so a usable model exists
# whenever they are interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

# 1. corpus -> 8192-token subset of the World vocabulary + flat uint16 token file (a few seconds)
$PY -m rwkvkit.train.vocab runs/demo_data --vocab-size 8192

# 2. phase 1: train Finch L6 C256 from scratch (ctx 128, 8 x 128 tokens per step, 1000 steps,
#    lr 1.5e-3 -> 1e-4 cosine): 1.02M tokens
nice -n 10 $PY -m rwkvkit.train.cli --config configs/demo.yaml

# 3. phase 2: continue from phase 1's checkpoint on other windows of the data (seed 1) with a
#    fresh short schedule (500 steps, lr 4e-4 -> 4e-5): 0.51M more tokens
nice -n 10 $PY -m rwkvkit.train.cli --config configs/demo.yaml load=runs/demo/rwkv-final.pth \
    out_dir=runs/demo2 seed=1 lr_init=4e-4 lr_final=4e-5 warmup_steps=10 max_steps=500 max_minutes=15

# 4. ship the final checkpoint (official .pth layout, bf16), its vocabulary, and the training log
cp runs/demo2/rwkv-final.pth rwkvkit/assets/demo-finch-L6-C256.pth
cp runs/demo_data/vocab.txt rwkvkit/assets/demo-finch-L6-C256.vocab.txt
$PY -m rwkvkit.train.metrics rwkvkit/assets/demo runs/demo runs/demo2
