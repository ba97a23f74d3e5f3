"""Training tokens/s (forward + backward), chunked vs naive WKV; see rwkvkit/bench/train.py."""

import sys

from rwkvkit.bench.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
