"""WKV op speed (naive, chunked, native); see rwkvkit/bench/ops.py."""

import sys

from rwkvkit.bench.ops import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
