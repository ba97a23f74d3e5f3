"""Eagle (RWKV-5.2): multi-headed matrix-valued state with a per-channel constant decay, and its
declarations.

The time-mix: r, k, v, g from lerped token-shift mixes; WKV (``rwkvkit.ops.wkv5``) per head with
``w = exp(-exp(time_decay))`` and bonus ``time_faaaa``; GroupNorm ``ln_x`` times ``silu(g)``; output.
The channel-mix is the shared lerp one. On the CPU without gradients (``fusable``) the four
token-shift mixes come out of one C pass in the compute dtype and GroupNorm * silu(gate) is one pass
(``rwkvkit.ops.fused``); the PyTorch code is the fallback.

``RWKV5`` declares the rest (``spec.Version``): detection (the 5.x family: ``time_mix_k`` and
``ln_x``; 5.0 and 5.1 are refused by name), the keys, the state and ``time_state`` layout, RWKV-LM's
initialisation and learning-rate multipliers, and the native step's layer record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CheckpointError, ModelConfig
from ..ops import fused, wkv5
from .common import (
    ChannelMix,
    Linear,
    compute_dtype,
    fusable,
    group_norm,
    heads_from_faaaa,
    ln_x_init,
    make_ln_x,
    native_wkv_kernel,
    token_shift,
)
from .spec import StateSlot, TimeStateLayout, Uniform, Version, per_head_matrix, rwkv_lm_ramps


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
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: tuple[torch.Tensor]
    ) -> tuple[torch.Tensor, bool, torch.dtype] | None:
        """The token-shift mixes the fused path starts with, as ``(mix [M, C], lerp, dtype)`` for
        ``fused.shift_mix``, or None when the fused path does not apply."""
        cdt = compute_dtype(self.receptance)
        if not fusable(self, x, cdt, inputs=(shift, *wkv_state)):
            return None
        mixes = torch.cat([self.time_mix_r, self.time_mix_k, self.time_mix_v, self.time_mix_g])
        return mixes.view(4, -1), True, cdt

    def forward(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv_state: tuple[torch.Tensor],
        backend: str,
        mixed: torch.Tensor | None = None,
        carry: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor]]:
        """x [B, T, C] normalised fp32; shift [B, C]; wkv_state (wkv [B, H, N, N] fp32, key x value,).
        ``mixed``: the mixes of ``shift_mix_spec`` already computed (the block fuses them with ln1).
        ``carry``: what layers pass on to later layers within the call (unused here)."""
        B, T, C = x.shape
        (state,) = wkv_state
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
            y, s = wkv5(r, k, v, w, self.time_faaaa.float(), state, backend=backend)
            ln = self.ln_x
            y = fused.group_norm_gate(
                y.reshape(B, T, C), self.gate(xg), ln.weight, ln.bias, H, ln.eps, dtype=cdt
            )
            return self.output(y), x[:, -1], (s,)
        prev = token_shift(x, shift)

        def lerp(mix: torch.Tensor) -> torch.Tensor:
            return x * mix + prev * (1 - mix)

        r = self.receptance(lerp(self.time_mix_r)).view(B, T, H, N)
        k = self.key(lerp(self.time_mix_k)).view(B, T, H, N)
        v = self.value(lerp(self.time_mix_v)).view(B, T, H, N)
        g = F.silu(self.gate(lerp(self.time_mix_g)))
        w = -torch.exp(self.time_decay.float())  # [H, N] log decay
        y, s = wkv5(r, k, v, w, self.time_faaaa.float(), state, backend=backend)
        y = group_norm(y.reshape(B, T, C), H, self.ln_x)
        return self.output(y * g), x[:, -1], (s,)


class RWKV5(Version):
    version = 5
    name = "Eagle (RWKV-5.2)"
    short = "Eagle"
    time_mix = TimeMix5
    channel_mix = ChannelMix
    recurrent = (StateSlot("wkv", per_head_matrix),)  # [H, N, N], key x value
    time_state = TimeStateLayout("wkv", transposed=True)  # RWKV-LM's files store [value, key]
    lr_mult = {"time_decay": 2.0, "time_faaaa": 3.0}
    zero_init = ("att.output", "ffn.value", "ffn.receptance")
    small_init = ("att.key", "att.gate")

    def detect(self, sd: Mapping[str, torch.Tensor]) -> bool:
        """The 5.x family (``time_mix_k`` and ``ln_x``): 5.2 when ``gate`` is present and ``time_decay``
        is [H, N] with N > 1; 5.0 (no gate) and 5.1 are refused."""
        att = "blocks.0.att."
        if att + "time_mix_k" not in sd or att + "ln_x.weight" not in sd:
            return False
        if att + "gate.weight" not in sd:
            raise CheckpointError("this is an RWKV-5.0 checkpoint (ln_x without gate); rwkvkit supports 5.2")
        td = sd.get(att + "time_decay")
        if td is None or td.dim() != 2 or td.shape[1] <= 1:
            shape = None if td is None else tuple(td.shape)
            raise CheckpointError(
                f"this is an RWKV-5.1 checkpoint (time_decay of shape {shape}); rwkvkit supports 5.2"
            )
        return True

    def read_sizes(self, sd: Mapping[str, torch.Tensor], n_embd: int) -> dict[str, int]:
        return {"head_size": heads_from_faaaa(sd, n_embd)}

    def default_ffn_dim(self, n_embd: int) -> int:
        return int(n_embd * 3.5) // 32 * 32

    def layer_keys(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        C, F, H, N = config.n_embd, config.ffn_dim, config.n_head, config.head_size
        keys = {f"att.time_mix_{m}": (1, 1, C) for m in "kvrg"}
        keys |= {"att.time_decay": (H, N), "att.time_faaaa": (H, N)}
        keys |= {f"att.{m}.weight": (C, C) for m in ("receptance", "key", "value", "output", "gate")}
        keys |= {"att.ln_x.weight": (C,), "att.ln_x.bias": (C,)}
        keys |= {"ffn.time_mix_k": (1, 1, C), "ffn.time_mix_r": (1, 1, C)}
        return keys | {"ffn.key.weight": (F, C), "ffn.receptance.weight": (C, C), "ffn.value.weight": (C, F)}

    def init_values(self, config: ModelConfig, layer: int) -> dict[str, torch.Tensor]:
        """mixes k = ddd^r10, v = ddd^r10 + 0.3 r01, r = g = ddd^(0.5 r10); decay -6 + 5 (n/(C-1))^(0.7 +
        1.3 r01); bonus r01 (1 - n/(C-1)) + ((n+1)%3 - 1) * 0.1; ln_x.weight ((l+1)/L)^0.7; ffn ddd^r10."""
        r01, r10, ddd, frac, zig = rwkv_lm_ramps(config, layer)
        H, N = config.n_head, config.head_size
        mr = ddd ** (0.5 * r10)
        out = {"att.time_mix_k": ddd**r10, "att.time_mix_v": ddd**r10 + 0.3 * r01, "att.time_mix_r": mr}
        out["att.time_mix_g"] = mr
        out["att.time_decay"] = (-6 + 5 * frac ** (0.7 + 1.3 * r01)).view(H, N)
        out["att.time_faaaa"] = (r01 * (1 - frac) + zig * 0.1).view(H, N)
        out |= ln_x_init(config, layer)
        return out | {"ffn.time_mix_k": ddd**r10, "ffn.time_mix_r": ddd**r10}

    def random_param(self, name: str, shape: tuple[int, ...], uniform: Uniform) -> torch.Tensor | None:
        if name.startswith("time_mix"):
            return uniform(shape, 0.0, 1.0)
        if name == "time_decay":  # log(-log w): -6 (slow decay) .. 1.5 (w = exp(-4.5))
            return uniform(shape, -6.0, 1.5)
        return uniform(shape, -1.0, 1.0) if name == "time_faaaa" else None

    def wkv_kernel(self, model: nn.Module) -> tuple[str, str]:
        return native_wkv_kernel(model, fused_epilogue=False)

    def native_header(self, config: ModelConfig) -> list[int]:
        return [0, 0]  # plan_t's D, Dw: no LoRAs

    def native_layer(self, plan: Any, block: nn.Module) -> None:
        """_decode_cpu.c's layer_t for Eagle: no maa_x, mixes k, v, r, g in maa[1..4], no LoRAs."""
        C = block.ln1.weight.numel()
        att, ffn = plan.own(block, "att"), plan.own(block, "ffn")
        for ln in ("ln1", "ln2"):
            plan.vec(plan.own(block, ln), "weight", C)
            plan.vec(getattr(block, ln), "bias", C)
        plan.ints += [0, 0]  # no maa_x, no w branch
        for m in "kvrg":
            plan.vec(att, f"time_mix_{m}", C)
        plan.vec(att, "time_decay", C)
        plan.vec(att, "time_faaaa", C)
        plan.vec(plan.own(att, "ln_x"), "weight", C)
        plan.vec(att.ln_x, "bias", C)
        plan.vec(ffn, ffn.mix_k_name, C)
        plan.vec(ffn, ffn.mix_r_name, C)
        for _ in range(4):
            plan.lora(None, "", 0, 0)
        for name in ("receptance", "key", "value", "gate", "output"):
            plan.matrix(att, name)
        for name in ("key", "receptance", "value"):
            plan.matrix(ffn, name)


SPEC = RWKV5()
