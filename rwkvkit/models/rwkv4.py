"""RWKV-4 (the paper's baseline): per-channel decay and bonus, a vector-valued state, and its declarations.

The time-mix: r, k, v from lerped token-shift mixes; WKV (``rwkvkit.ops.wkv4``) with
``w = -exp(time_decay)``, ``u = time_first`` over the running-max state (aa, bb, pp per channel, pp
starting at -1e30); out = ``Wo(sigmoid(r) * wkv)``. The channel-mix is the shared lerp one.
On the CPU without gradients (``fusable``) the three token-shift mixes come out of one C pass in the
compute dtype (``rwkvkit.ops.fused``); the PyTorch lerps are the fallback.

``RWKV4`` declares the rest (``spec.Version``): detection (``time_first`` and ``time_mix_k`` without
``ln_x``), the keys, the state, RWKV-LM's initialisation and learning-rate multipliers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..config import ModelConfig
from ..ops import fused, wkv4
from .common import ChannelMix, Linear, compute_dtype, fusable, token_shift
from .spec import StateSlot, Uniform, Version, per_channel, rwkv_lm_ramps


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
        carry: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """x [B, T, C] normalised fp32; shift [B, C]; wkv_state (aa, bb, pp) [B, C] fp32 each.
        ``mixed``: the mixes of ``shift_mix_spec`` already computed (the block fuses them with ln1).
        ``carry``: what layers pass on to later layers within the call (unused here)."""
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


class RWKV4(Version):
    version = 4
    name = "RWKV-4"
    short = "RWKV-4"
    time_mix = TimeMix4
    channel_mix = ChannelMix
    heads = False
    recurrent = (
        StateSlot("aa", per_channel),
        StateSlot("bb", per_channel),
        StateSlot("pp", per_channel, -1e30),
    )
    lr_mult = {"time_decay": 2.0, "time_first": 3.0}
    zero_init = ("att.output", "ffn.value", "ffn.receptance", "att.key", "att.receptance")

    def detect(self, sd: Mapping[str, torch.Tensor]) -> bool:
        att = "blocks.0.att."
        return att + "time_first" in sd and att + "time_mix_k" in sd and att + "ln_x.weight" not in sd

    def read_sizes(self, sd: Mapping[str, torch.Tensor], n_embd: int) -> dict[str, int]:
        return {}

    def layer_keys(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        C, F = config.n_embd, config.ffn_dim
        keys = {f"att.time_mix_{m}": (1, 1, C) for m in "kvr"}
        keys |= {"att.time_decay": (C,), "att.time_first": (C,)}
        keys |= {f"att.{m}.weight": (C, C) for m in ("receptance", "key", "value", "output")}
        keys |= {"ffn.time_mix_k": (1, 1, C), "ffn.time_mix_r": (1, 1, C)}
        return keys | {"ffn.key.weight": (F, C), "ffn.receptance.weight": (C, C), "ffn.value.weight": (C, F)}

    def init_values(self, config: ModelConfig, layer: int) -> dict[str, torch.Tensor]:
        """time_mix_k = ddd^r10, _v = ddd^r10 + 0.3 r01, _r = ddd^(0.5 r10); decay -5 + 8 (n/(C-1))^(0.7 +
        1.3 r01); time_first log(0.3) + ((n+1)%3 - 1) * 0.5; ffn mixes ddd^r10."""
        r01, r10, ddd, frac, zig = rwkv_lm_ramps(config, layer)
        out = {
            "att.time_mix_k": ddd**r10,
            "att.time_mix_v": ddd**r10 + 0.3 * r01,
            "att.time_mix_r": ddd ** (0.5 * r10),
        }
        out["att.time_decay"] = -5 + 8 * frac ** (0.7 + 1.3 * r01)
        out["att.time_first"] = math.log(0.3) + zig * 0.5
        return out | {"ffn.time_mix_k": ddd**r10, "ffn.time_mix_r": ddd**r10}

    def random_param(self, name: str, shape: tuple[int, ...], uniform: Uniform) -> torch.Tensor | None:
        if name.startswith("time_mix"):
            return uniform(shape, 0.0, 1.0)
        if name == "time_decay":  # log(-log w): -6 (slow decay) .. 1 (fast)
            return uniform(shape, -6.0, 1.0)
        return uniform(shape, -1.0, 1.0) if name == "time_first" else None


SPEC = RWKV4()
