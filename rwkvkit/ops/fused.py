"""Fused element-wise CPU kernels around an RWKV block's matrices (``rwkvkit.ops._fused_cpu``), inference.

Between the matrix products a block runs chains of element-wise work: residual adds, LayerNorms,
token-shift mixes, GroupNorm times the gate, relu^2, sigmoid gating, and the dtype casts between them. Each function here does one
chain in a single C pass over the rows, reading and writing fp32 or bf16 directly. The math is the
PyTorch path's (``rwkvkit.models``), rounding intermediates to the compute dtype where that path does,
so a bf16 model gives the same numbers up to an occasional last-bit difference.

The models call these only when ``usable(...)`` says so: the extension is built (it is optional; the
project's install step compiles it), every tensor is on the CPU, no gradient is wanted, and the
choice in force (``rwkvkit.kernels``: the model's ``Kernels.fused``) allows them. The functions check shapes and dtypes and make inputs contiguous; rows are
split over the same number of threads as torch uses (one thread for small inputs).
"""

from __future__ import annotations

import torch

from .. import kernels

try:
    from . import _fused_cpu
except ImportError:  # pragma: no cover - depends on the build
    _fused_cpu = None

Tensor = torch.Tensor
DTYPES = (torch.float32, torch.bfloat16)  # the dtypes the kernels read and write
_CODE = {torch.float32: 0, torch.bfloat16: 1}
_ROW_MIN_WORK = 1 << 15  # elements per call below which one thread is used


def available() -> bool:
    """True when the C extension was built."""
    return _fused_cpu is not None


def configure(portable: bool) -> None:
    """Portable code only (no AVX-512, no AMX) or the CPU's best; see ``rwkvkit.kernels.set_portable``."""
    if _fused_cpu is not None:
        _fused_cpu.configure(portable=int(portable))


configure(kernels.PORTABLE)


def plain(*tensors: Tensor | None) -> bool:
    """True when every tensor is an ordinary tensor or parameter whose memory the kernels may read
    (not a subclass such as FSDP2's sharded DTensor, whose data pointer is only the local shard)."""
    return all(t is None or type(t) in _PLAIN for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def usable(*tensors: Tensor | None) -> bool:
    """True when the models may use the fused kernels for these tensors: built, chosen
    (``kernels.active().fused``), all plain tensors on the CPU, no gradient wanted."""
    if _fused_cpu is None or not kernels.active().fused or not plain(*tensors):
        return False
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return not grad and all(t is None or t.device.type == "cpu" for t in tensors)


def _threads(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // _ROW_MIN_WORK))


def _code(name: str, t: Tensor) -> int:
    if t.dtype not in _CODE:
        raise ValueError(f"{name} must be float32 or bfloat16, got {t.dtype}")
    return _CODE[t.dtype]


def _ext():
    if _fused_cpu is None:
        raise RuntimeError(
            "the fused CPU kernels are not built; reinstall rwkvkit with a C compiler "
            "(pip install --no-build-isolation -e .)"
        )
    return _fused_cpu


def shift_mix(x: Tensor, prev: Tensor, mix: Tensor, *, lerp: bool, dtype: torch.dtype) -> Tensor:
    """The token-shift mixes of x with its previous token, in ``dtype``.

    x [B, T, C] (fp32); prev [B, C], the token before x[:, 0]; mix [M, C], one vector per mix. Returns
    [M, B, T, C] with ``x + (p - x) * mix_j`` (Finch, ``lerp=False``) or ``x * mix_j + p * (1 - mix_j)``
    (RWKV-4/5), p the previous token's x. (Finch's data-dependent mixes: ``finch_mix``.)
    """
    ext = _ext()
    B, T, C = x.shape
    if tuple(prev.shape) != (B, C):
        raise ValueError(f"prev must be [B, C] = {(B, C)}, got {tuple(prev.shape)}")
    if mix.dim() != 2 or mix.shape[1] != C:
        raise ValueError(f"mix must be [M, C] with C = {C}, got {tuple(mix.shape)}")
    M = mix.shape[0]
    out_dt = _code("dtype", torch.empty(0, dtype=dtype))
    f = torch.float32
    x, prev, mix = (t.to(f).contiguous() for t in (x, prev, mix))
    out = torch.empty((M, B, T, C), dtype=dtype)
    ext.mix(
        R=B * T, T=T, C=C, M=M, x=x.data_ptr(), prev=prev.data_ptr(), mix=mix.data_ptr(), lerp=int(lerp),
        out_dt=out_dt, out=out.data_ptr(), threads=_threads(M * B * T * C),
    )  # fmt: skip
    return out


def finch_mix(x: Tensor, prev: Tensor, m: Tensor, w2: Tensor, maa: Tensor, dtype: torch.dtype) -> Tensor:
    """Finch's five branch mixes ``x + d * (maa_j + m_j @ w2_j)`` (j = w, k, v, r, g) in ``dtype``, the
    LoRA product computed in the same pass (it never goes to memory).

    x [B, T, C] fp32; prev [B, C]; m [B, T, 5D] (``tanh(xxx @ maa_w1)``); w2 [5, D, C] (``maa_w2``);
    maa [5, C] (``maa_w, maa_k, ...`` stacked). Returns [5, B, T, C]. d = previous token's x - x.
    """
    ext = _ext()
    B, T, C = x.shape
    D = w2.shape[1]
    if tuple(prev.shape) != (B, C) or tuple(w2.shape) != (5, D, C) or tuple(maa.shape) != (5, C):
        raise ValueError(f"need prev [B, C], w2 [5, D, C], maa [5, C] for x {(B, T, C)}")
    if tuple(m.shape) != (B, T, 5 * D):
        raise ValueError(f"m must be [B, T, 5D] = {(B, T, 5 * D)}, got {tuple(m.shape)}")
    out_dt = _code("dtype", torch.empty(0, dtype=dtype))
    f = torch.float32
    # bf16 m and w2 (the model's) go in as they are: exact products, summed in fp32 by AMX tiles where
    # the CPU has them; otherwise both as fp32
    mw = torch.bfloat16 if m.dtype == w2.dtype == torch.bfloat16 else f
    x, prev, maa = (t.to(f).contiguous() for t in (x, prev, maa))
    m, w2 = m.to(mw).contiguous(), w2.to(mw).contiguous()
    out = torch.empty((5, B, T, C), dtype=dtype)
    ext.finch_mix(
        R=B * T, T=T, C=C, D=D, x=x.data_ptr(), prev=prev.data_ptr(), m=m.data_ptr(), w2=w2.data_ptr(),
        mw_dt=_CODE[mw], maa=maa.data_ptr(), out_dt=out_dt, out=out.data_ptr(), threads=_threads(5 * B * T * C * 8),
    )  # fmt: skip
    return out


def group_norm_gate(
    y: Tensor, g: Tensor, weight: Tensor, bias: Tensor, n_head: int, eps: float, dtype: torch.dtype
) -> Tensor:
    """``(GroupNorm(y) * weight + bias) * silu(g)`` in ``dtype``: y [B, T, C] (the WKV output, fp32),
    g [B, T, C] the gate before its silu (fp32 or bf16; silu is rounded to g's dtype as ``F.silu``
    does), per-head LayerNorm over ``C // n_head`` channels with ``eps``, weight and bias [C]."""
    ext = _ext()
    B, T, C = y.shape
    if tuple(g.shape) != (B, T, C):
        raise ValueError(f"g must have the shape of y {(B, T, C)}, got {tuple(g.shape)}")
    if C % n_head or tuple(weight.shape) != (C,) or tuple(bias.shape) != (C,):
        raise ValueError(f"need n_head | C and weight, bias [C]; got C={C}, n_head={n_head}")
    g_dt, out_dt = _code("g", g), _code("dtype", torch.empty(0, dtype=dtype))
    f = torch.float32
    y, weight, bias = (t.to(f).contiguous() for t in (y, weight, bias))
    g = g.contiguous()
    out = torch.empty((B, T, C), dtype=dtype)
    ext.group_norm_gate(
        R=B * T, C=C, N=C // n_head, y=y.data_ptr(), g=g.data_ptr(), g_dt=g_dt, weight=weight.data_ptr(),
        bias=bias.data_ptr(), eps=float(eps), out=out.data_ptr(), out_dt=out_dt, threads=_threads(B * T * C),
    )  # fmt: skip
    return out


def relu_square_(k: Tensor) -> Tensor:
    """``k = relu(k) ** 2`` in place (fp32 or bf16, contiguous); returns k."""
    ext = _ext()
    dt = _code("k", k)
    if not k.is_contiguous():
        raise ValueError("relu_square_ needs a contiguous tensor")
    ext.relu_square(n=k.numel(), k=k.data_ptr(), dt=dt, threads=_threads(k.numel()))
    return k


def sigmoid_mul(r: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``sigmoid(r) * v`` computed as on tensors of r's dtype (sigmoid and product rounded to it),
    returned in ``dtype`` (default r's dtype). r, v [..., C] of the same shape and dtype."""
    return _sigmoid_mul(r, v, dtype, None)


def sigmoid_mul_add_(x: Tensor, r: Tensor, v: Tensor) -> Tensor:
    """``x += sigmoid(r) * v`` in place (the block's residual add after the channel-mix), the product
    as in ``sigmoid_mul``: the same value as ``x + sigmoid_mul(r, v, torch.float32)``. x float32,
    contiguous, of r's shape; returns x."""
    if x.shape != r.shape or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 tensor of r's shape {tuple(r.shape)}")
    return _sigmoid_mul(r, v, torch.float32, x)


def _sigmoid_mul(r: Tensor, v: Tensor, dtype: torch.dtype | None, x: Tensor | None) -> Tensor:
    ext = _ext()
    if r.shape != v.shape or r.dtype != v.dtype:
        raise ValueError(f"r and v must match: {tuple(r.shape)} {r.dtype} vs {tuple(v.shape)} {v.dtype}")
    in_dt = _code("r", r)
    dtype = r.dtype if dtype is None else dtype
    out_dt = _code("dtype", torch.empty(0, dtype=dtype))
    r, v = r.contiguous(), v.contiguous()
    C = r.shape[-1]
    out = torch.empty(r.shape, dtype=dtype) if x is None else x  # rows are read before they are written
    ext.sigmoid_mul(
        R=r.numel() // C, C=C, r=r.data_ptr(), v=v.data_ptr(), in_dt=in_dt, out=out.data_ptr(), out_dt=out_dt,
        res=None if x is None else x.data_ptr(), threads=_threads(r.numel()),
    )  # fmt: skip
    return out


def add_norm_mix(
    x: Tensor,
    add: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    prev: Tensor,
    mix: Tensor,
    *,
    lerp: bool,
    dtype: torch.dtype,
    want_normed: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The residual add, a LayerNorm and the token-shift mixes of its output, in one pass over the rows.

    x [B, T, C] fp32 (the residual stream); add [B, T, C] fp32 or bf16 or None (then the residual is x
    itself); weight, bias [C]; prev [B, C] the LayerNorm output of the token before x[:, 0]; mix [M, C].
    With ``s = x + add`` and ``n = LayerNorm(s)``, returns ``(s, mixes, last, normed)``: mixes [M, B, T, C]
    in ``dtype`` as ``shift_mix(n, prev, mix, lerp=lerp, dtype=dtype)``, last = n[:, -1] [B, C] (the
    next shift state), normed = n [B, T, C] fp32 when ``want_normed`` else None. The LayerNorm sums in
    the kernels' own order (``row_sum``): it agrees with ``F.layer_norm`` to a few fp32 ulps.
    """
    ext = _ext()
    B, T, C = x.shape
    if add is not None and tuple(add.shape) != (B, T, C):
        raise ValueError(f"add must have x's shape {(B, T, C)}, got {tuple(add.shape)}")
    if tuple(prev.shape) != (B, C) or tuple(weight.shape) != (C,) or tuple(bias.shape) != (C,):
        raise ValueError(f"need prev [B, C] and weight, bias [C] for x {(B, T, C)}")
    if mix.dim() != 2 or mix.shape[1] != C:
        raise ValueError(f"mix must be [M, C] with C = {C}, got {tuple(mix.shape)}")
    M = mix.shape[0]
    out_dt = _code("dtype", torch.empty(0, dtype=dtype))
    add_dt = _code("add", add) if add is not None else 0
    f = torch.float32
    x, weight, bias, prev, mix = (t.to(f).contiguous() for t in (x, weight, bias, prev, mix))
    add = add.contiguous() if add is not None else None
    s = torch.empty((B, T, C), dtype=f) if add is not None else x
    normed = torch.empty((B, T, C), dtype=f) if want_normed else None
    last = torch.empty((B, C), dtype=f)
    out = torch.empty((M, B, T, C), dtype=dtype)
    ext.add_norm_mix(
        R=B * T, T=T, C=C, M=M, x=x.data_ptr(), add=None if add is None else add.data_ptr(), add_dt=add_dt,
        ln_w=weight.data_ptr(), ln_b=bias.data_ptr(), eps=float(eps), prev=prev.data_ptr(), mix=mix.data_ptr(),
        lerp=int(lerp), out_dt=out_dt, x_out=None if add is None else s.data_ptr(),
        xn_out=None if normed is None else normed.data_ptr(), last=last.data_ptr(), out=out.data_ptr(),
        threads=_threads((M + 2) * B * T * C),
    )  # fmt: skip
    return s, out, last, normed


def lora_available() -> bool:
    """True when ``lora_tanh`` can run: the extension is built and the CPU has AMX-BF16."""
    return _fused_cpu is not None and bool(getattr(_fused_cpu, "finch_mix_amx", 0))


def lora_fits(x: Tensor, w1: Tensor, w2: Tensor | None = None) -> bool:
    """True when ``lora_tanh`` takes these operands: bf16, on the CPU, the sizes its tiles need."""
    ts = (x, w1) if w2 is None else (x, w1, w2)
    if not lora_available() or not usable(*ts) or any(t.dtype != torch.bfloat16 for t in ts):
        return False
    K, D = w1.shape
    ok = x.shape[-1] == K and K % 32 == 0 and D % (16 if w2 is None else 32) == 0
    return ok and (w2 is None or (w2.dim() == 2 and w2.shape[0] == D and w2.shape[1] % 16 == 0))


def lora_tanh(x: Tensor, w1: Tensor, w2: Tensor | None = None) -> Tensor:
    """Finch's LoRA ``tanh(x @ w1)`` (and ``tanh(x @ w1) @ w2``) on bf16 tensors, rounded as the PyTorch
    path rounds them (the product to bf16, tanh to bf16, the second product to bf16), in one AMX kernel.

    x [..., K], w1 [K, D], w2 [D, N]; needs ``lora_fits``. Returns [..., D] or [..., N] bf16. tanh is the
    kernel's own, a few fp32 ulps from torch's, so an output can land one bf16 ulp away from it."""
    ext = _ext()
    if not lora_fits(x, w1, w2):
        raise ValueError(
            "lora_tanh needs AMX and bf16 x [..., K], w1 [K, D], w2 [D, N] with K % 32 == 0, "
            f"D % 16 == 0 (% 32 with w2), N % 16 == 0; got x {tuple(x.shape)} {x.dtype}, "
            f"w1 {tuple(w1.shape)} {w1.dtype}, w2 {None if w2 is None else tuple(w2.shape)}"
        )
    K, D = w1.shape
    N = D if w2 is None else w2.shape[1]
    x2, w1 = x.reshape(-1, K).contiguous(), w1.contiguous()
    w2 = None if w2 is None else w2.contiguous()
    R = x2.shape[0]
    out = torch.empty((*x.shape[:-1], N), dtype=torch.bfloat16)
    if R:
        ext.lora(
            R=R, K=K, D=D, N=N, x=x2.data_ptr(), w1=w1.data_ptr(), w2=None if w2 is None else w2.data_ptr(),
            out=out.data_ptr(), threads=_threads(R * K * 8),
        )  # fmt: skip
    return out
