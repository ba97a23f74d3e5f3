"""RWKV-4 time-mix (the paper's baseline): per-channel decay and bonus, vector-valued state.

On the CPU without gradients (``fusable``) the three token-shift mixes come out of one C pass in the
compute dtype (``rwkvkit.ops.fused``); the PyTorch lerps are the fallback.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..ops import fused, wkv4
from .common import Linear, compute_dtype, fusable, token_shift


class TimeMix4(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, C))
        self.time_decay = nn.Parameter(torch.zeros(C))  # w = -exp(time_decay), per channel
        self.time_first = nn.Parameter(torch.zeros(C))  # u, the bonus of the current token
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.receptance = Linear(C, C)
        self.output = Linear(C, C)

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: tuple[torch.Tensor, ...], backend: str
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """x [B, T, C] normalised fp32; shift [B, C]; wkv_state (aa, bb, pp) [B, C] fp32 each."""
        mk, mv, mr = self.time_mix_k, self.time_mix_v, self.time_mix_r
        cdt = compute_dtype(self.key)
        if fusable(self, x, cdt, inputs=(shift, *wkv_state)):
            xk, xv, xr = fused.shift_mix(x, shift, torch.cat([mk, mv, mr]).view(3, -1), lerp=True, dtype=cdt)
        else:
            prev = token_shift(x, shift)
            xk = x * mk + prev * (1 - mk)
            xv = x * mv + prev * (1 - mv)
            xr = x * mr + prev * (1 - mr)
        r = torch.sigmoid(self.receptance(xr))
        k, v = self.key(xk), self.value(xv)
        w = -torch.exp(self.time_decay.float())
        y, new = wkv4(w, self.time_first.float(), k, v, wkv_state, backend=backend)
        return self.output(r * y), x[:, -1], new
