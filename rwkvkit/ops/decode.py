"""Bindings of the native one-token step and int8 matrix kernels (``rwkvkit.ops._decode_cpu``).

The C side is described in ``rwkvkit/ops/_decode_cpu.c``; this module only says whether it was built
and exposes its entry points with the matrix kinds it understands. The extension is optional (built by
the install step when a C compiler with OpenMP is present); callers fall back to PyTorch without it.
"""

from __future__ import annotations

import torch

from .. import kernels

try:
    from . import _decode_cpu
except ImportError:  # pragma: no cover - depends on the build
    _decode_cpu = None

MK_F32, MK_BF16, MK_Q8, MK_F16 = 0, 1, 2, 3
Q8_BLOCK = 32  # inputs per int8 scale, as ggml's Q8_0


def available() -> bool:
    return _decode_cpu is not None


def configure(portable: bool, *, bf16dp: bool = True, rowdot: bool = True) -> None:
    """Portable code only (no AVX-512) or the CPU's best; see ``rwkvkit.kernels.set_portable``.
    ``_decode_cpu.avx512`` says which the kernels use. ``bf16dp=False`` (tests): the bf16-activation
    kernels use fp32 FMAs even where the CPU has VDPBF16PS, as on AVX-512 CPUs without AVX512_BF16.
    ``rowdot=False`` (tests, A/B timing): one row of bf16 / int8 weights takes the widening kernels
    instead of the dot kernels (VDPBF16PS / VPDPBUSD), as on AVX-512 CPUs without AVX512_BF16 / VNNI
    (``_decode_cpu.dot_bf16`` / ``dot_vnni`` say which run)."""
    if _decode_cpu is not None:
        _decode_cpu.configure(portable=int(portable), bf16dp=int(bf16dp), rowdot=int(rowdot))


configure(kernels.PORTABLE)


def _ext():
    if _decode_cpu is None:
        raise RuntimeError(
            "the native decode kernels are not built; reinstall rwkvkit with a C compiler that has OpenMP "
            "(pip install --no-build-isolation -e .)"
        )
    return _decode_cpu


def matrix_kind(weight: torch.Tensor) -> int | None:
    """The kernel kind for a dense weight (fp32, bf16 or fp16, contiguous, CPU, a plain tensor: not e.g.
    an FSDP2 DTensor, whose data pointer is a local shard), or None if unsupported."""
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return None
    if weight.device.type != "cpu" or not weight.is_contiguous():
        return None
    return {torch.float32: MK_F32, torch.bfloat16: MK_BF16, torch.float16: MK_F16}.get(weight.dtype)


def bf16dp() -> bool:
    """Whether the bf16-activation kernels use VDPBF16PS (AVX512_BF16) rather than fp32 FMAs."""
    return bool(_decode_cpu is not None and _decode_cpu.bf16dp)


def q8_matmul(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, act_bf16: bool = False
) -> torch.Tensor:
    """``x [M, K] @ (q * scale)^T`` in float32: q int8 [N, K], scale fp16 [N, K / 32]; M small (decode).

    ``act_bf16``: the kernels of a batched step instead: x rounded to bf16 times the matrix dequantised
    to bf16 (``q8_dequantize_bf16``), fp32 sums."""
    ext = _ext()
    x = x.to(torch.float32).contiguous()
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty((M, N), dtype=torch.float32)
    ext.matmul(
        kind=MK_Q8,
        w=q.data_ptr(),
        s=scale.data_ptr(),
        n=N,
        k=K,
        x=x.data_ptr(),
        m=M,
        y=y.data_ptr(),
        act_bf16=int(act_bf16),
        threads=torch.get_num_threads(),
    )
    return y


def dense_matmul(x: torch.Tensor, w: torch.Tensor, *, act_bf16: bool = False) -> torch.Tensor:
    """``x [M, K] @ w^T`` in float32 with the step's kernels, w fp32, bf16 or fp16 [N, K] (benchmarks, tests);
    ``act_bf16`` (bf16 w): x rounded to bf16, as a batched step's products."""
    ext = _ext()
    kind = matrix_kind(w)
    if kind is None:
        raise ValueError(
            f"dense_matmul takes a contiguous fp32, bf16 or fp16 CPU matrix, got {w.dtype} on {w.device}"
        )
    x = x.to(torch.float32).contiguous()
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty((M, N), dtype=torch.float32)
    ext.matmul(
        kind=kind,
        w=w.data_ptr(),
        s=0,
        n=N,
        k=K,
        x=x.data_ptr(),
        m=M,
        y=y.data_ptr(),
        act_bf16=int(act_bf16),
        threads=torch.get_num_threads(),
    )
    return y


def q8_dequantize_bf16(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The bf16 matrix ``q * scale`` (for prefill, where a bf16 matmul beats M matrix-vector products)."""
    ext = _ext()
    N, K = q.shape
    out = torch.empty((N, K), dtype=torch.bfloat16)
    ext.dequantize_q8(
        q=q.data_ptr(), s=scale.data_ptr(), n=N, k=K, out=out.data_ptr(), threads=torch.get_num_threads()
    )
    return out
