"""Scoring throughput, batched vs one at a time, against the rwkv package; see rwkvkit/bench/score.py."""

import sys

from rwkvkit.bench.score import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
