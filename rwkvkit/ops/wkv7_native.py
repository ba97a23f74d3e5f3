"""The native CPU WKV-7 kernel (``rwkvkit.ops._wkv7_cpu``), a fast twin of ``wkv7_naive`` for inference.

The C kernel runs the exact per-token recurrence, one pass over each head's state per token,
vectorised (AVX-512 for N = 64, a portable loop otherwise) and threaded over (batch, head) pairs on
PyTorch's OpenMP pool. Prompts of 4+ tokens run on the state transposed to key-major, where every
loop is an axpy (no reductions); shorter calls (decode) update the [value, key] state row by row.
r, w, k, v, a, b are read as fp32 or bf16 as they are (converted per token in C), and the decay
exp(w) is taken per token in C, so there is no cast or exp pass over [B, T, H, N]. It has no autograd: ``wkv7`` uses it only for CPU
tensors when no gradient is wanted. ``available()`` says whether the extension was built (it is
optional; the install step builds it with the C compiler).
"""

from __future__ import annotations

import torch

try:
    from . import _wkv7_cpu
except ImportError:  # pragma: no cover - depends on the build
    _wkv7_cpu = None

Tensor = torch.Tensor
_THREAD_MIN_WORK = 1 << 22  # state elements updated per call below which one thread is used


def available() -> bool:
    return _wkv7_cpu is not None


def usable(*tensors: Tensor | None) -> bool:
    """True when the kernel applies: built, all CPU, no gradient wanted."""
    if _wkv7_cpu is None:
        return False
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return not grad and all(t is None or t.device.type == "cpu" for t in tensors)


def wkv7_native(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor, *, portable: bool = False
) -> tuple[Tensor, Tensor]:
    """Same contract as ``wkv7_naive``: r, w, k, v, a, b [B, T, H, N] (w the log decay), s0 [B, H,
    N(value), N(key)] (not modified). Returns y [B, T, H, N] fp32 and the final state fp32.
    Each of the six inputs is read as it is when bf16 or fp32; other dtypes are cast to fp32 first.
    ``portable`` runs the portable C loop even where the AVX-512 one applies (for tests)."""
    if _wkv7_cpu is None:
        raise RuntimeError(
            "the native WKV-7 kernel is not built; reinstall rwkvkit with a C compiler "
            "(pip install --no-build-isolation -e .)"
        )
    B, T, H, N = r.shape
    xs = [x.contiguous() if x.dtype in (torch.float32, torch.bfloat16) else x.float().contiguous()
          for x in (r, w, k, v, a, b)]  # fmt: skip
    state = s0.to(torch.float32).clone().contiguous()
    y = torch.empty((B, T, H, N), dtype=torch.float32)
    # starting threads costs more than a few tokens of work: decode steps run on the calling thread
    work = B * T * H * N * N
    threads = max(1, min(torch.get_num_threads(), B * H)) if work >= _THREAD_MIN_WORK else 1
    ptr = {name: x.data_ptr() for name, x in zip("rwkvab", xs)}
    bf16 = {f"{name}_bf16": int(x.dtype == torch.bfloat16) for name, x in zip("rwkvab", xs)}
    _wkv7_cpu.wkv7_forward(
        B=B,
        T=T,
        H=H,
        N=N,
        **ptr,
        **bf16,
        state=state.data_ptr(),
        y=y.data_ptr(),
        threads=threads,
        portable=portable,
    )
    return y, state
