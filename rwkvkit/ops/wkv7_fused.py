"""RWKV-7's time-mix between its matrices for CPU prompts in one C pass (``rwkvkit.ops._wkv7_fused``).

``timemix`` takes the outputs of the block's matrix products and LoRAs and returns the input of the
output matrix, the final WKV state and ``v_first``: what ``TimeMix7.forward`` computes from
``r, k, v`` on (the math is in ``rwkvkit/ops/_wkv7_fused.c``'s docstring; the PyTorch code in
``rwkvkit/models/rwkv7.py`` is its twin, and the tests hold the two together). Inference only (no
autograd); ``available()`` says whether the optional extension was built.
"""

from __future__ import annotations

import math

import torch

from .. import kernels

try:
    from . import _wkv7_fused
except ImportError:  # pragma: no cover - depends on the build
    _wkv7_fused = None

Tensor = torch.Tensor
_IO = (torch.float32, torch.bfloat16)


def available() -> bool:
    return _wkv7_fused is not None


def timemix(
    mats: dict[str, Tensor | None],
    params: dict[str, Tensor],
    state: Tensor,
    v_first: Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """mats: ``r, k, v, zw, za, zv, g`` [B, T, C] fp32 or bf16 (``zw = tanh(x_w @ w1) @ w2``,
    ``za = (x_a @ a1) @ a2``, ``zv = (x_v @ v1) @ v2`` or None in layer 0, ``g = sigmoid(x_g @ g1) @ g2``);
    params: ``w0, a0, v0, k_k, k_a, r_k, lnx_w, lnx_b``, C numbers each; state [B, H, N, N] fp32
    (not modified); v_first [B, T, C] (None in layer 0). Returns (out [B, T, C] in ``out_dtype``, the
    input of the output matrix; the new state; v_first, layer 0's values)."""
    B, H, N, _ = state.shape
    T = mats["r"].shape[1]
    first = v_first is None
    ins = {}
    for name, t in mats.items():
        if t is None:
            ins[name], ins[f"{name}_bf16"] = 0, 0
            continue
        if t.dtype not in _IO or not t.is_contiguous():
            t = mats[name] = t.float().contiguous()
        ins[name], ins[f"{name}_bf16"] = t.data_ptr(), int(t.dtype == torch.bfloat16)
    ps = {k: v.reshape(-1).float().contiguous() for k, v in params.items()}
    s = state.to(torch.float32).clone().contiguous()
    vf = torch.empty((B, T, H * N), dtype=torch.float32) if first else v_first.float().contiguous()
    out = torch.empty((B, T, H * N), dtype=out_dtype)
    _wkv7_fused.timemix(
        B=B, T=T, H=H, N=N, **ins, v_first=vf.data_ptr(), **{k: v.data_ptr() for k, v in ps.items()},
        state=s.data_ptr(), out=out.data_ptr(), out_bf16=int(out_dtype == torch.bfloat16),
        first=int(first), threads=torch.get_num_threads(), portable=int(kernels.PORTABLE),
    )  # fmt: skip
    return out, s, vf


def timemix_ref(
    mats: dict[str, Tensor | None],
    params: dict[str, Tensor],
    state: Tensor,
    v_first: Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """``timemix``'s twin in PyTorch (fp32, the naive WKV-7), same signature and results."""
    from .wkv7 import wkv7_naive

    B, H, N, _ = state.shape
    T = mats["r"].shape[1]
    m = {k: None if t is None else t.float() for k, t in mats.items()}
    p = {k: t.reshape(-1).float() for k, t in params.items()}
    heads = (B, T, H, N)
    kk = torch.nn.functional.normalize((m["k"] * p["k_k"]).view(heads), dim=-1)
    a = torch.sigmoid(p["a0"] + m["za"])
    k = m["k"] * (1 + (a - 1) * p["k_a"])
    if v_first is None:
        v = v_first = m["v"]
    else:
        v = torch.lerp(m["v"], v_first.float(), torch.sigmoid(p["v0"] + m["zv"]))
    w = torch.sigmoid(p["w0"] + m["zw"]) * -math.exp(-0.5)
    y, s = wkv7_naive(
        m["r"].view(heads), w.view(heads), k.view(heads), v.view(heads), -kk, kk * a.view(heads), state
    )
    y = torch.nn.functional.group_norm(y.reshape(B * T, H * N), H, p["lnx_w"], p["lnx_b"], eps=64e-5)
    bonus = (m["r"] * k * p["r_k"]).view(heads).sum(-1, keepdim=True)
    out = (y.view(heads) + bonus * v.view(heads)).view(B, T, H * N) * m["g"]
    return out.to(out_dtype), s, v_first
