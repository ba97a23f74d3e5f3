"""Eagle (RWKV-5.2) time-mix: multi-headed matrix-valued state with a per-channel constant decay.

On the CPU without gradients (``fusable``) the four token-shift mixes come out of one C pass in the
compute dtype and GroupNorm * silu(gate) is one pass (``rwkvkit.ops.fused``); the PyTorch code is
the fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops import fused, wkv5
from .common import Linear, compute_dtype, fusable, group_norm, make_ln_x, token_shift


class TimeMix5(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size = H, N
        for m in "kvrg":
            setattr(self, f"time_mix_{m}", nn.Parameter(torch.zeros(1, 1, C)))
        self.time_decay = nn.Parameter(torch.zeros(H, N))  # log(-log w)
        self.time_faaaa = nn.Parameter(torch.zeros(H, N))  # u, the bonus
        self.receptance = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.gate = Linear(C, C)
        self.output = Linear(C, C)
        self.ln_x = make_ln_x(config)

    def shift_mix_spec(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor
    ) -> tuple[torch.Tensor, bool, torch.dtype] | None:
        """The token-shift mixes the fused path starts with, as ``(mix [M, C], lerp, dtype)`` for
        ``fused.shift_mix``, or None when the fused path does not apply."""
        cdt = compute_dtype(self.receptance)
        if not fusable(self, x, cdt, inputs=(shift, wkv_state)):
            return None
        mixes = torch.cat([self.time_mix_r, self.time_mix_k, self.time_mix_v, self.time_mix_g])
        return mixes.view(4, -1), True, cdt

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
        H, N = self.n_head, self.head_size
        cdt = compute_dtype(self.receptance)
        spec = self.shift_mix_spec(x, shift, wkv_state) if mixed is None else None
        if mixed is not None or spec is not None:
            if mixed is None:
                mixed = fused.shift_mix(x, shift, spec[0], lerp=True, dtype=cdt)
            xr, xk, xv, xg = mixed
            r = self.receptance(xr).view(B, T, H, N)
            k = self.key(xk).view(B, T, H, N)
            v = self.value(xv).view(B, T, H, N)
            w = -torch.exp(self.time_decay.float())
            y, s = wkv5(r, k, v, w, self.time_faaaa.float(), wkv_state, backend=backend)
            ln = self.ln_x
            y = fused.group_norm_gate(
                y.reshape(B, T, C), self.gate(xg), ln.weight, ln.bias, H, ln.eps, dtype=cdt
            )
            return self.output(y), x[:, -1], s
        prev = token_shift(x, shift)

        def lerp(mix: torch.Tensor) -> torch.Tensor:
            return x * mix + prev * (1 - mix)

        r = self.receptance(lerp(self.time_mix_r)).view(B, T, H, N)
        k = self.key(lerp(self.time_mix_k)).view(B, T, H, N)
        v = self.value(lerp(self.time_mix_v)).view(B, T, H, N)
        g = F.silu(self.gate(lerp(self.time_mix_g)))
        w = -torch.exp(self.time_decay.float())  # [H, N] log decay
        y, s = wkv5(r, k, v, w, self.time_faaaa.float(), wkv_state, backend=backend)
        y = group_norm(y.reshape(B, T, C), H, self.ln_x)
        return self.output(y * g), x[:, -1], s
