"""The native CPU WKV kernel (``rwkvkit.ops._wkv_cpu``), a fast twin of ``wkv6_naive`` for inference.

The C kernel runs the exact per-token recurrence with one pass over the state per token, vectorised
over the value dimension and threaded over (batch, head) pairs. It has no autograd: the dispatcher
uses it only for CPU tensors when no gradient is needed, and otherwise falls back to the PyTorch
forms. ``available()`` says whether the extension was built (it is optional; the project's install
step builds it with the C compiler).
"""

from __future__ import annotations

import torch

try:
    from . import _wkv_cpu
except ImportError:  # pragma: no cover - depends on the build
    _wkv_cpu = None

Tensor = torch.Tensor
_THREAD_MIN_WORK = 1 << 22  # state elements updated per call below which one thread is used


def available() -> bool:
    return _wkv_cpu is not None


def usable(*tensors: Tensor) -> bool:
    """True when the kernel applies: built, all CPU, no gradient wanted."""
    if _wkv_cpu is None:
        return False
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return not grad and all(t is None or t.device.type == "cpu" for t in tensors)


def wkv6_native(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as ``wkv6_naive``: r, k, v [B, T, H, N]; w [B, T, H, N] or [H, N] log decay;
    u [H, N]; s0 [B, H, N, N] (not modified). Returns y [B, T, H, N] fp32 and the final state."""
    if _wkv_cpu is None:
        raise RuntimeError(
            "the native WKV kernel is not built; reinstall rwkvkit with a C compiler "
            "(pip install --no-build-isolation -e .)"
        )
    B, T, H, N = r.shape
    f = torch.float32
    r, k, v, u = (x.to(f).contiguous() for x in (r, k, v, u))
    per_token = w.dim() == 4
    if per_token and w.stride(1) == 0:  # a broadcast constant decay
        w = w[0, 0]
        per_token = False
    w = torch.exp(w.to(f)).contiguous()  # decay factors in [0, 1], exponentiated here (vectorised)
    state = s0.to(f).clone().contiguous()
    y = torch.empty((B, T, H, N), dtype=f)
    # starting a thread costs more than a few tokens of work: decode steps run on the calling thread
    threads = max(1, min(torch.get_num_threads(), B * H)) if B * T * H * N * N >= _THREAD_MIN_WORK else 1
    _wkv_cpu.wkv_forward(
        B, T, H, N,
        r.data_ptr(), k.data_ptr(), v.data_ptr(), w.data_ptr(), u.data_ptr(), state.data_ptr(), y.data_ptr(),
        int(per_token), threads,
    )  # fmt: skip
    return y, state
