"""Server throughput at 1, 4 and 16 concurrent clients (same as ``rwkvkit bench serve``)."""

import sys

from rwkvkit.bench.serve import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
