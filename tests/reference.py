"""The reference implementation (the `rwkv` package, 0.8.32) for parity tests, on CPU in fp32.

Its configuration lives in environment variables read at import time, so they are set here once,
before the first import. Import this module instead of `rwkv` directly.
"""

from __future__ import annotations

import os

os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"

import torch  # noqa: E402
from rwkv.model import RWKV as _RefRWKV  # noqa: E402


def load_reference(path: str | os.PathLike, strategy: str = "cpu fp32") -> _RefRWKV:
    """The reference model for a .pth file (the package appends '.pth' itself, so it is stripped)."""
    name = str(path)
    name = name[: -len(".pth")] if name.endswith(".pth") else name
    return _RefRWKV(model=name, strategy=strategy, verbose=False)


def reference_logits(ref: _RefRWKV, tokens: list[int], state=None) -> tuple[torch.Tensor, list]:
    """Logits at every position [T, V] float32 and the reference's state list after the sequence."""
    with torch.no_grad():
        if len(tokens) == 1:
            out, state = ref.forward(tokens, state)
            return out.float().unsqueeze(0), state
        out, state = ref.forward(tokens, state, full_output=True)
        return out.float(), state
