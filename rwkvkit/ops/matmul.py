"""The bf16 CPU matrix product of a prefill: ``y = x @ W^T`` on AMX tiles (``rwkvkit.ops._matmul_cpu``).

This module owns the AMX linear kernel: bf16 x [..., K] times the ``nn.Linear`` weight W [N, K] as it
is stored (no packed copy is kept: each thread packs 32-row panels of W into the tile layout while
the tiles work on the previous panel), bf16 output, fp32 sums, optionally followed by the
channel-mix's ``relu(y)^2`` in the same pass (rounded as ``fused.relu_square_(F.linear(x, W))``).
It exists because in a prefill every weight is used once and arrives cold from memory, where
F.linear (oneDNN) loses about a third of its hot speed; see the C file for the scheme.

``available()``: built, and the CPU has AMX-BF16 (Sapphire Rapids on) and Linux granted the tile
state. ``applies(x, w)`` says whether the fast path takes a product (bf16, CPU, N and K multiples
of 32, and chosen: ``rwkvkit.kernels``, the model's ``Kernels.amx_matmul``);
``rwkvkit.models.common.Linear`` uses it for multi-row inputs without gradients.
"""

from __future__ import annotations

import torch

from .. import kernels

try:
    from . import _matmul_cpu
except ImportError:  # pragma: no cover - depends on the build
    _matmul_cpu = None

Tensor = torch.Tensor
EPILOGUES = (None, "relu2")


def available() -> bool:
    """True when the kernel is built and this CPU (and kernel) let it use AMX-BF16 tiles."""
    return _matmul_cpu is not None and bool(_matmul_cpu.available)


def unavailable_reason() -> str:
    """Why ``available()`` is False ('' when it is True)."""
    if _matmul_cpu is None:
        return "the extension is not built"
    if kernels.PORTABLE:
        return "portable kernels forced (RWKVKIT_PORTABLE_KERNELS / kernels.set_portable)"
    return "" if available() else "this CPU has no AMX-BF16 (or Linux did not grant the tile state)"


def configure(portable: bool) -> None:
    """Portable code only (no AMX) or the CPU's best; see ``rwkvkit.kernels.set_portable``."""
    if _matmul_cpu is not None:
        _matmul_cpu.configure(portable=int(portable))


configure(kernels.PORTABLE)


def applies(x: Tensor, w: Tensor) -> bool:
    """True when ``linear(x, w)`` takes the fast path and the models may use it: available, chosen
    (``kernels.active().amx_matmul``), both bf16 on the CPU, w 2-D [N, K] with N and K multiples of
    32 and x [..., K]."""
    return (
        kernels.active().amx_matmul
        and available()
        and type(w) in (Tensor, torch.nn.Parameter)  # not a subclass (FSDP2's DTensor: a local shard)
        and type(x) in (Tensor, torch.nn.Parameter)
        and w.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and w.device.type == "cpu"
        and x.device.type == "cpu"
        and w.dim() == 2
        and w.shape[0] % 32 == 0
        and w.shape[1] % 32 == 0
        and x.dim() >= 1
        and x.shape[-1] == w.shape[1]
    )


def linear(x: Tensor, w: Tensor, epilogue: str | None = None) -> Tensor:
    """``x @ w.T`` (``epilogue="relu2"``: then ``relu(.)^2``) for bf16 x [..., K], w [N, K] on the CPU;
    returns bf16 [..., N]. N and K must be multiples of 32. Inference only (no autograd)."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if not isinstance(x, Tensor) or not isinstance(w, Tensor):
        raise ValueError("x and w must be tensors")
    if x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        raise ValueError(f"x and w must be bfloat16, got {x.dtype} and {w.dtype}")
    if x.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError("x and w must be on the CPU")
    if w.dim() != 2 or x.dim() < 1:
        raise ValueError(f"w must be [N, K] and x [..., K], got {tuple(w.shape)} and {tuple(x.shape)}")
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension {x.shape[-1]} does not match w's K = {K}")
    if N % 32 or K % 32 or N == 0 or K == 0:
        raise ValueError(f"N and K must be positive multiples of 32, got N = {N}, K = {K}")
    if not available():
        raise RuntimeError("the AMX matmul is not available (not built, or the CPU has no AMX-BF16)")
    M = x.numel() // K
    y = torch.empty(*x.shape[:-1], N, dtype=torch.bfloat16)
    if M == 0:
        return y
    x, w = x.contiguous(), w.contiguous()
    _matmul_cpu.linear(
        M=M,
        N=N,
        K=K,
        x=x.data_ptr(),
        w=w.data_ptr(),
        y=y.data_ptr(),
        relu2=int(epilogue == "relu2"),
        threads=torch.get_num_threads(),
    )
    return y


def gated_residual_(res: Tensor, x: Tensor, w: Tensor, r: Tensor) -> Tensor:
    """``res += sigmoid(r) * (x @ w.T)`` in place, rounded as the channel-mix's PyTorch path (the product
    to bf16, sigmoid to bf16, their product to bf16, then the fp32 add): the same values as
    ``res + fused.sigmoid_mul(r, linear(x, w), torch.float32)``. res fp32 contiguous [..., N], r bf16
    [..., N], x, w as in ``linear``; returns res."""
    if not applies(x, w):
        raise ValueError("gated_residual_ needs what linear needs: bf16 x [..., K], w [N, K] (32 | N, K)")
    N, K = w.shape
    shape = (*x.shape[:-1], N)
    if tuple(res.shape) != shape or res.dtype != torch.float32 or not res.is_contiguous():
        raise ValueError(
            f"res must be a contiguous float32 tensor {shape}, got {tuple(res.shape)} {res.dtype}"
        )
    if tuple(r.shape) != shape or r.dtype != torch.bfloat16:
        raise ValueError(f"r must be bfloat16 {shape}, got {tuple(r.shape)} {r.dtype}")
    M = x.numel() // K
    if M == 0:
        return res
    x, w, r = x.contiguous(), w.contiguous(), r.contiguous()
    _matmul_cpu.linear(
        M=M,
        N=N,
        K=K,
        x=x.data_ptr(),
        w=w.data_ptr(),
        relu2=0,
        gate=r.data_ptr(),
        res=res.data_ptr(),
        threads=torch.get_num_threads(),
    )
    return res
