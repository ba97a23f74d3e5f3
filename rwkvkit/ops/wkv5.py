"""The Eagle (RWKV-5.2) WKV recurrence: Finch's op with a time-constant decay.

Eagle's decay is a per-head, per-channel constant, so ``wkv5`` broadcasts it over batch and time and
runs the Finch op (``rwkvkit.ops.wkv6``), naive or chunked; the math, the backends and the stability
argument live there.
"""

from __future__ import annotations

import torch

from .wkv6 import _dispatch, check_inputs

Tensor = torch.Tensor


def wkv5(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    *,
    backend: str = "chunked",
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Eagle WKV over a sequence.

    Args:
        r, k, v: [B, T, H, N], any float dtype (computed in fp32).
        w: log decay [H, N], w <= 0 (the model passes -exp(time_decay)); the same for every token.
        u: bonus (``time_faaaa``) [H, N].
        state: [B, H, N, N] fp32 laid out [key, value], or None for zeros. Not modified.
        backend, chunk_size: as in ``wkv6``.

    Returns:
        y [B, T, H, N] fp32 and the final state [B, H, N, N] fp32.
    """
    B, T, H, N = check_inputs(r, k, v, w, u, state, w_per_token=False)
    return _dispatch(r, k, v, w.expand(B, T, H, N), u, state, backend, chunk_size, B, T, H, N)
