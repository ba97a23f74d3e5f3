"""Bindings of RWKV-7's one-call native decode step (``rwkvkit.ops._decode_v7``).

The C side is described in ``rwkvkit/ops/_decode_v7.c``; its plan is written by
``rwkvkit/models/rwkv7_step.py``. The extension is optional (built by the install step when a C
compiler with OpenMP is present); without it RWKV-7's one-token calls run the PyTorch modules.
"""

from __future__ import annotations

try:
    from . import _decode_v7
except ImportError:  # pragma: no cover - depends on the build
    _decode_v7 = None


def available() -> bool:
    return _decode_v7 is not None


def layout() -> tuple[int, int]:
    """(header ints, ints per layer) of the C side's plan."""
    return _decode_v7.layout()


def avx512() -> bool:
    """Whether the CPU has the features of the AVX-512 kernels (used unless the portable setting is on)."""
    return _decode_v7 is not None and bool(_decode_v7.avx512())


def step(**kwargs: int) -> None:
    """One token of every row: see ``_decode_v7.c`` for the keyword arguments."""
    _decode_v7.step(**kwargs)
