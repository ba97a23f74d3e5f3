"""Eagle (RWKV-5.2) time-mix: multi-headed matrix-valued state with a per-channel constant decay."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..ops import wkv5
from .common import Linear, group_norm, make_ln_x, token_shift


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

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: torch.Tensor, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] normalised fp32; shift [B, C]; wkv_state [B, H, N, N] fp32 (key x value)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
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
