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

    def shift_mix_spec(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, bool, torch.dtype] | None:
        """The token-shift mixes the fused path starts with, as ``(mix [M, C], lerp, dtype)`` for
        ``fused.shift_mix``, or None when the fused path does not apply."""
        cdt = compute_dtype(self.key)
        if not fusable(self, x, cdt, inputs=(shift, *wkv_state)):
            return None
        return torch.cat([self.time_mix_k, self.time_mix_v, self.time_mix_r]).view(3, -1), True, cdt

    def forward(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv_state: tuple[torch.Tensor, ...],
        backend: str,
        mixed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """x [B, T, C] normalised fp32; shift [B, C]; wkv_state (aa, bb, pp) [B, C] fp32 each.
        ``mixed``: the mixes of ``shift_mix_spec`` already computed (the block fuses them with ln1)."""
        mk, mv, mr = self.time_mix_k, self.time_mix_v, self.time_mix_r
        spec = self.shift_mix_spec(x, shift, wkv_state) if mixed is None else None
        if mixed is not None or spec is not None:
            if mixed is None:
                mixed = fused.shift_mix(x, shift, spec[0], lerp=True, dtype=spec[2])
            xk, xv, xr = mixed
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
