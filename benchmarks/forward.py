"""Prefill/decode speed against the rwkv package; see rwkvkit/bench/forward.py."""

import sys

from rwkvkit.bench.forward import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
