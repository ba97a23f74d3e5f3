"""World tokenizer speed and memory against the rwkv reference; see rwkvkit/bench/tokenizer.py."""

import sys

from rwkvkit.bench.tokenizer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
