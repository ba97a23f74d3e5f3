"""WKV recurrences, one public function per architecture version, backend chosen by argument.

- ``wkv4(w, u, k, v, state)``: RWKV-4 (scalar state per channel: aa, bb, pp).
- ``wkv5(r, k, v, w, u, state)``: Eagle, matrix state per head, time-constant decay.
- ``wkv6(r, k, v, w, u, state)``: Finch, matrix state per head, data-dependent decay.
- ``wkv7(r, w, k, v, a, b, state)``: Goose, the generalised delta rule (state [value, key]).

Each has ``backend="naive"`` (fp32 per-step loop, the source of truth), ``"chunked"`` (parallel
form in plain PyTorch, the default), ``"auto"`` (the fastest that applies: the C kernel for CPU
inference, flash-linear-attention on CUDA for v5-v7, else naive for one token and chunked). The naive
and chunked forms are differentiable. The naive twins ``wkv4_naive`` / ``wkv6_naive`` take
already-validated fp32 inputs; ``wkv7_naive`` has ``wkv7``'s signature (less the backend arguments).
"""

from .wkv4 import wkv4, wkv4_naive
from .wkv5 import wkv5
from .wkv6 import wkv6, wkv6_naive
from .wkv7 import wkv7, wkv7_naive

__all__ = ["wkv4", "wkv4_naive", "wkv5", "wkv6", "wkv6_naive", "wkv7", "wkv7_naive"]
