"""The native CPU WKV kernel (``rwkvkit.ops._wkv_cpu``), a fast twin of ``wkv6_naive`` for inference.

The C kernel runs the exact per-token recurrence with one pass over the state per token, vectorised
over the value dimension and threaded over (batch, head) pairs (OpenMP, PyTorch's thread pool). bf16
r, k, v are read as they are, and ``wkv6_native_finch`` takes Finch's decay before its two exps, so
the model's fused path (``rwkvkit.models.rwkv6``) makes no cast or exp passes over [B, T, C]. It has
no autograd: the dispatcher uses it only for CPU tensors when no gradient is needed, and otherwise
falls back to the PyTorch forms. ``available()`` says whether the extension was built (it is
optional; the project's install step builds it with the C compiler).
"""

from __future__ import annotations

from typing import NamedTuple

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


def _rkv(r: Tensor, k: Tensor, v: Tensor) -> tuple[tuple[Tensor, ...], int]:
    """r, k, v as the kernel reads them: all bf16 as they are (converted per token in C), else fp32."""
    if r.dtype == k.dtype == v.dtype == torch.bfloat16:
        return tuple(x.contiguous() for x in (r, k, v)), 1
    return tuple(x.to(torch.float32).contiguous() for x in (r, k, v)), 0


def _run(r: Tensor, k: Tensor, v: Tensor, w: Tensor, w_base: Tensor | None, u: Tensor, s0: Tensor,
         per_token: bool, gn: GroupNormGate | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    if _wkv_cpu is None:
        raise RuntimeError(
            "the native WKV kernel is not built; reinstall rwkvkit with a C compiler "
            "(pip install --no-build-isolation -e .)"
        )
    B, T, H, N = r.shape
    f = torch.float32
    (r, k, v), rkv_bf16 = _rkv(r, k, v)
    u = u.to(f).contiguous()
    w_bf16 = int(w.dtype == torch.bfloat16 and w_base is not None)
    w = w.contiguous() if w_bf16 else w.to(f).contiguous()
    state = s0.to(f).clone().contiguous()
    if gn is None:
        y = out = torch.empty((B, T, H, N), dtype=f)
        g = ln_w = ln_b = None
    else:
        g, ln_w, ln_b = gn.g.contiguous(), gn.weight.to(f).contiguous(), gn.bias.to(f).contiguous()
        if g.dtype not in (f, torch.bfloat16) or gn.dtype not in (f, torch.bfloat16):
            raise ValueError(f"g and dtype must be float32 or bfloat16, got {g.dtype}, {gn.dtype}")
        if g.numel() != B * T * H * N or ln_w.numel() != H * N or ln_b.numel() != H * N:
            raise ValueError("g must have B*T*H*N elements and weight, bias H*N")
        y, out = None, torch.empty((B, T, H, N), dtype=gn.dtype)
    # starting a thread costs more than a few tokens of work: decode steps run on the calling thread
    threads = max(1, min(torch.get_num_threads(), B * H)) if B * T * H * N * N >= _THREAD_MIN_WORK else 1
    ptr = lambda t: None if t is None else t.data_ptr()
    _wkv_cpu.wkv_forward(
        B=B, T=T, H=H, N=N, r=r.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), w=w.data_ptr(),
        w_base=ptr(w_base), u=u.data_ptr(), state=state.data_ptr(), y=ptr(y), w_per_token=int(per_token),
        rkv_bf16=rkv_bf16, w_bf16=w_bf16, g=ptr(g), ln_w=ptr(ln_w), ln_b=ptr(ln_b),
        eps=0.0 if gn is None else float(gn.eps), out=out.data_ptr(),
        g_bf16=int(g is not None and g.dtype == torch.bfloat16), out_bf16=int(out.dtype == torch.bfloat16),
        threads=threads,
    )  # fmt: skip
    return out, state


def wkv6_native(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as ``wkv6_naive``: r, k, v [B, T, H, N]; w [B, T, H, N] or [H, N] log decay;
    u [H, N]; s0 [B, H, N, N] (not modified). Returns y [B, T, H, N] fp32 and the final state.
    bf16 r, k, v are read as they are; other dtypes are cast to fp32 first."""
    B, T, H, N = r.shape
    per_token = w.dim() == 4
    if per_token and w.stride(1) == 0:  # a broadcast constant decay
        w = w[0, 0]
        per_token = False
    w = torch.exp(w.to(torch.float32))  # decay factors in [0, 1], exponentiated here (vectorised)
    return _run(r, k, v, w, None, u, s0, per_token)


class GroupNormGate(NamedTuple):
    """The epilogue ``wkv6_native_finch`` can apply per token and head instead of returning y:
    ``(LayerNorm_N(y) * weight + bias) * silu(g)`` in ``dtype`` (Eagle/Finch's ``ln_x`` and gate).
    g: [B, T, H*N] gate before its silu (fp32 or bf16; silu rounded to its dtype, as ``F.silu``);
    weight, bias: [H*N]; eps: the GroupNorm eps; dtype: fp32 or bf16."""

    g: Tensor
    weight: Tensor
    bias: Tensor
    eps: float
    dtype: torch.dtype


def wkv6_native_finch(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    ww: Tensor,
    time_decay: Tensor,
    u: Tensor,
    s0: Tensor,
    gn: GroupNormGate | None = None,
) -> tuple[Tensor, Tensor]:
    """``wkv6_native`` with Finch's decay given before its two exps: the log decay is
    ``-exp(time_decay + ww)``, computed in the kernel token by token (no passes over [B, T, C]).

    ww [B, T, H, N] fp32 or bf16 (the decay LoRA's output); time_decay [H * N] (any shape with H * N
    elements, cast to fp32); r, k, v, u, s0 as in ``wkv6_native``. With ``gn`` the first result is the
    GroupNorm-and-gate output [B, T, H, N] in ``gn.dtype`` instead of y (y never goes to memory)."""
    B, T, H, N = r.shape
    if tuple(ww.shape) != (B, T, H, N) or time_decay.numel() != H * N:
        raise ValueError(f"ww must be [B, T, H, N] = {(B, T, H, N)} and time_decay have {H * N} elements")
    base = time_decay.to(torch.float32).reshape(H * N).contiguous()
    return _run(r, k, v, ww, base, u, s0, True, gn)
