"""WKV recurrences, one public function per architecture version, backend chosen by argument.

- ``wkv4(w, u, k, v, state)``: RWKV-4 (scalar state per channel: aa, bb, pp).
- ``wkv5(r, k, v, w, u, state)``: Eagle, matrix state per head, time-constant decay.
- ``wkv6(r, k, v, w, u, state)``: Finch, matrix state per head, data-dependent decay.

Each has ``backend="naive"`` (fp32 per-step loop, the source of truth), ``"chunked"`` (parallel
form in plain PyTorch, the default), ``"auto"`` (naive for one token, else chunked). All backends are
differentiable. The naive twins ``wkv4_naive`` / ``wkv6_naive`` take already-validated fp32 inputs.
"""

from .wkv4 import wkv4, wkv4_naive
from .wkv5 import wkv5
from .wkv6 import wkv6, wkv6_naive

__all__ = ["wkv4", "wkv4_naive", "wkv5", "wkv6", "wkv6_naive"]
