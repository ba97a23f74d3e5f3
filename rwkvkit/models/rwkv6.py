"""Finch (RWKV-6) time-mix: data-dependent token shift and decay through small LoRA projections.

``d = prev - x``; ``m = tanh((x + d*maa_x) @ maa_w1)`` split in five (w, k, v, r, g) and projected back
by ``maa_w2``; each branch mixes ``x + d*(maa_j + m_j)``. The decay is per token and channel:
``w_t = exp(-exp(time_decay + tanh(x_w @ decay_w1) @ decay_w2))``, computed in fp32.

On the CPU without gradients (``fusable``) the element-wise steps run fused (``_forward_fused``): the
mixes come out of C passes straight in the compute dtype (the five branches together with their
``maa_w2`` product), and the native WKV kernel takes the decay before its two exps and applies
GroupNorm * silu(gate) to each token's head output as it produces it. ``forward``'s PyTorch code is
the fallback and defines the math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops import fused, native, wkv6
from .common import Linear, compute_dtype, fusable, group_norm, make_ln_x, token_shift


class TimeMix6(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        D, Dw = config.mix_lora, config.decay_lora
        self.n_head, self.head_size, self.mix_lora = H, N, D
        for m in "xwkvrg":
            setattr(self, f"time_maa_{m}", nn.Parameter(torch.zeros(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.zeros(C, 5 * D))
        self.time_maa_w2 = nn.Parameter(torch.zeros(5, D, C))
        self.time_decay = nn.Parameter(torch.zeros(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.zeros(C, Dw))
        self.time_decay_w2 = nn.Parameter(torch.zeros(Dw, C))
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.gate = Linear(C, C)
        self.output = Linear(C, C)
        self.ln_x = make_ln_x(config)

    @property
    def maa5(self) -> torch.Tensor:
        """The five branch mixes (w, k, v, r, g) stacked: [5, 1, 1, C] fp32."""
        return torch.stack(
            [self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g]
        ).float()

    def shift_mix_spec(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor
    ) -> tuple[torch.Tensor, bool, torch.dtype] | None:
        """The token-shift mixes the fused path starts with, as ``(mix [M, C], lerp, dtype)`` for
        ``fused.shift_mix``, or None when the fused path does not apply (then ``forward`` takes no
        ``mixed``)."""
        cdt, ldt = compute_dtype(self.receptance), self.time_maa_w1.dtype
        if not fusable(self, x, cdt, ldt, inputs=(shift, wkv_state)):
            return None
        return self.time_maa_x.view(1, -1), False, ldt

    def forward(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv_state: torch.Tensor,
        backend: str,
        mixed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] normalised fp32; shift [B, C]; wkv_state [B, H, N, N] fp32 (key x value).
        ``mixed``: the mixes of ``shift_mix_spec`` already computed (the block fuses them with ln1)."""
        B, T, C = x.shape
        H, N, D = self.n_head, self.head_size, self.mix_lora
        cdt = compute_dtype(self.receptance)
        if mixed is not None or fusable(self, x, cdt, self.time_maa_w1.dtype, inputs=(shift, wkv_state)):
            return self._forward_fused(x, shift, wkv_state, backend, cdt, mixed)
        d = token_shift(x, shift) - x
        w1 = self.time_maa_w1
        m = torch.tanh(torch.addcmul(x, d, self.time_maa_x).to(w1.dtype) @ w1).float()  # [B, T, 5D]
        # the five branch mixes at once: maa_j + m_j @ w2_j (one baddbmm, fp32: CPU bf16 bmm at K=32 is slow),
        # then x + d * (maa_j + m_j), cast once for the five matrices that read them
        mix = torch.baddbmm(
            self.maa5.view(5, 1, C), m.view(B * T, 5, D).transpose(0, 1), self.time_maa_w2.float()
        )
        mixed = torch.addcmul(x, d, mix.view(5, B, T, C)).to(cdt)
        xw, xk, xv, xr, xg = mixed.unbind(0)
        r = self.receptance(xr).view(B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = F.silu(self.gate(xg))
        dw1, dw2 = self.time_decay_w1, self.time_decay_w2
        ww = self.time_decay.float() + (torch.tanh(xw.to(dw1.dtype) @ dw1) @ dw2).float()
        w = -torch.exp(ww).view(B, T, H, N)  # log decay, per token and channel
        y, s = wkv6(r, k, v, w, self.time_faaaa.float(), wkv_state, backend=backend)
        y = group_norm(y.reshape(B, T, C), H, self.ln_x)
        return self.output(y * g), x[:, -1], s

    def _forward_fused(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv_state: torch.Tensor,
        backend: str,
        cdt: torch.dtype,
        mixed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``forward`` with the element-wise steps in the fused CPU kernels (same math, same roundings)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        w1 = self.time_maa_w1
        if mixed is None:
            mixed = fused.shift_mix(x, shift, self.time_maa_x.view(1, C), lerp=False, dtype=w1.dtype)
        xxx = mixed[0]
        # [B, T, 5D]: one AMX kernel for bf16 (same roundings), else tanh through fp32 (the same values
        # as tanh on the bf16 tensor, about twice as fast)
        if fused.lora_fits(xxx, w1):
            m = fused.lora_tanh(xxx, w1)
        else:
            m = torch.tanh((xxx @ w1).float()).to(w1.dtype)
        # x + d * (maa_j + m_j @ w2_j) for the five branches, the LoRA product inside the kernel
        xw, xk, xv, xr, xg = fused.finch_mix(x, shift, m, self.time_maa_w2, self.maa5.view(5, C), cdt)
        r = self.receptance(xr).view(B, T, H, N)
        k = self.key(xk).view(B, T, H, N)
        v = self.value(xv).view(B, T, H, N)
        g = self.gate(xg)  # silu applied in group_norm_gate
        dw1, dw2 = self.time_decay_w1, self.time_decay_w2
        if fused.lora_fits(xw, dw1, dw2):  # the decay before time_decay and its two exps
            ww = fused.lora_tanh(xw, dw1, dw2).view(B, T, H, N)
        else:
            ww = (torch.tanh(xw.to(dw1.dtype) @ dw1) @ dw2).view(B, T, H, N)
        u, ln = self.time_faaaa.float(), self.ln_x
        if backend in ("auto", "native") and native.usable(r, k, v, ww, u, wkv_state):
            # decay, WKV, GroupNorm and gate in one kernel: out [B, T, H, N] in the compute dtype
            gn = native.GroupNormGate(g, ln.weight, ln.bias, ln.eps, cdt)
            y, s = native.wkv6_native_finch(r, k, v, ww, self.time_decay, u, wkv_state, gn)
            return self.output(y.view(B, T, C)), x[:, -1], s
        w = -torch.exp(self.time_decay.float().view(H, N) + ww.float())
        y, s = wkv6(r, k, v, w, u, wkv_state, backend=backend)
        y = fused.group_norm_gate(y.reshape(B, T, C), g, ln.weight, ln.bias, H, ln.eps, dtype=cdt)
        return self.output(y), x[:, -1], s
