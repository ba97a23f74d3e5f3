"""Finch (RWKV-6): data-dependent token shift and decay through small LoRA projections, and its
declarations.

``d = prev - x``; ``m = tanh((x + d*maa_x) @ maa_w1)`` split in five (w, k, v, r, g) and projected back
by ``maa_w2``; each branch mixes ``x + d*(maa_j + m_j)``. The decay is per token and channel:
``w_t = exp(-exp(time_decay + tanh(x_w @ decay_w1) @ decay_w2))``, computed in fp32.

On the CPU without gradients (``fusable``) the element-wise steps run fused (``_forward_fused``): the
mixes come out of C passes straight in the compute dtype (the five branches together with their
``maa_w2`` product), and the native WKV kernel takes the decay before its two exps and applies
GroupNorm * silu(gate) to each token's head output as it produces it. ``forward``'s PyTorch code is
the fallback and defines the math. The channel-mix is the shared one with Finch's mix convention
(``time_maa_k/r``: ``x + (prev-x)*maa``).

``RWKV6`` declares the rest (``spec.Version``): detection (``time_maa_*``), the LoRA widths read from
the shapes (``mix_lora`` D: ``time_maa_w1`` is [C, 5D]; ``decay_lora`` Dw: ``time_decay_w1`` is
[C, Dw]), the keys, which parameters are matrices (the LoRAs), the state and ``time_state`` layout,
RWKV-LM's initialisation and learning-rate multipliers, and the native step's layer record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CheckpointError, ModelConfig
from ..ops import fused, native, wkv6
from .common import (
    ChannelMix,
    Linear,
    compute_dtype,
    fusable,
    group_norm,
    heads_from_faaaa,
    ln_x_init,
    lora_mm,
    make_ln_x,
    native_wkv_kernel,
    token_shift,
)
from .spec import StateSlot, TimeStateLayout, Uniform, Version, per_head_matrix, rwkv_lm_ramps


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
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: tuple[torch.Tensor]
    ) -> tuple[torch.Tensor, bool, torch.dtype] | None:
        """The token-shift mixes the fused path starts with, as ``(mix [M, C], lerp, dtype)`` for
        ``fused.shift_mix``, or None when the fused path does not apply (then ``forward`` takes no
        ``mixed``)."""
        cdt, ldt = compute_dtype(self.receptance), self.time_maa_w1.dtype
        if not fusable(self, x, cdt, ldt, inputs=(shift, *wkv_state)):
            return None
        return self.time_maa_x.view(1, -1), False, ldt

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
        H, N, D = self.n_head, self.head_size, self.mix_lora
        cdt = compute_dtype(self.receptance)
        (state,) = wkv_state
        if mixed is not None or fusable(self, x, cdt, self.time_maa_w1.dtype, inputs=(shift, state)):
            y, s = self._forward_fused(x, shift, state, backend, cdt, mixed)
            return y, x[:, -1], (s,)
        d = token_shift(x, shift) - x
        w1 = self.time_maa_w1
        m = torch.tanh(lora_mm(torch.addcmul(x, d, self.time_maa_x), w1)).float()  # [B, T, 5D]
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
        ww = self.time_decay.float() + lora_mm(torch.tanh(lora_mm(xw, dw1)), dw2).float()
        w = -torch.exp(ww).view(B, T, H, N)  # log decay, per token and channel
        y, s = wkv6(r, k, v, w, self.time_faaaa.float(), state, backend=backend)
        y = group_norm(y.reshape(B, T, C), H, self.ln_x)
        return self.output(y * g), x[:, -1], (s,)

    def _forward_fused(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv_state: torch.Tensor,
        backend: str,
        cdt: torch.dtype,
        mixed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` with the element-wise steps in the fused CPU kernels (same math, same roundings):
        (output [B, T, C], new wkv state)."""
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
            return self.output(y.view(B, T, C)), s
        w = -torch.exp(self.time_decay.float().view(H, N) + ww.float())
        y, s = wkv6(r, k, v, w, u, wkv_state, backend=backend)
        y = fused.group_norm_gate(y.reshape(B, T, C), g, ln.weight, ln.bias, H, ln.eps, dtype=cdt)
        return self.output(y), s


class ChannelMix6(ChannelMix):
    """Finch's channel-mix: ``time_maa_k/r``, mixed as ``x + (prev - x) * maa``."""

    MIX = "time_maa"
    LERP = False


_LORAS = ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2")


class RWKV6(Version):
    version = 6
    name = "Finch (RWKV-6)"
    short = "Finch"
    time_mix = TimeMix6
    channel_mix = ChannelMix6
    sizes = {"mix_lora": 32, "decay_lora": 64}  # D and Dw; 7B-class files use 64 and 128
    matrix_params = _LORAS
    recurrent = (StateSlot("wkv", per_head_matrix),)  # [H, N, N], key x value
    time_state = TimeStateLayout("wkv", transposed=True)  # RWKV-LM's files store [value, key]
    lr_mult = {"time_decay": 2.0, "time_decay_w1": 2.0, "time_decay_w2": 2.0, "time_faaaa": 3.0}
    zero_init = ("att.output", "ffn.value", "ffn.receptance")
    small_init = ("att.key", "att.gate")

    def detect(self, sd: Mapping[str, torch.Tensor]) -> bool:
        att = "blocks.0.att."
        return att + "time_maa_x" in sd or att + "time_maa_w1" in sd

    def read_sizes(self, sd: Mapping[str, torch.Tensor], n_embd: int) -> dict[str, int]:
        att = "blocks.0.att."
        w1, dw1 = sd.get(att + "time_maa_w1"), sd.get(att + "time_decay_w1")
        if w1 is None or dw1 is None:
            raise CheckpointError("RWKV-6 checkpoint without time_maa_w1 / time_decay_w1")
        if w1.dim() != 2 or w1.shape[1] % 5:
            raise CheckpointError(f"time_maa_w1 must be [n_embd, 5*D], got {tuple(w1.shape)}")
        if dw1.dim() != 2:
            raise CheckpointError(f"time_decay_w1 must be [n_embd, Dw], got {tuple(dw1.shape)}")
        head_size = heads_from_faaaa(sd, n_embd)
        return {"head_size": head_size, "mix_lora": w1.shape[1] // 5, "decay_lora": dw1.shape[1]}

    def default_ffn_dim(self, n_embd: int) -> int:
        return int(n_embd * 3.5) // 32 * 32

    def layer_keys(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        C, F, H, N = config.n_embd, config.ffn_dim, config.n_head, config.head_size
        D, Dw = config.mix_lora, config.decay_lora
        keys = {f"att.time_maa_{m}": (1, 1, C) for m in "xwkvrg"}
        keys |= {"att.time_maa_w1": (C, 5 * D), "att.time_maa_w2": (5, D, C)}
        keys |= {"att.time_decay": (1, 1, C), "att.time_decay_w1": (C, Dw), "att.time_decay_w2": (Dw, C)}
        keys["att.time_faaaa"] = (H, N)
        keys |= {f"att.{m}.weight": (C, C) for m in ("receptance", "key", "value", "output", "gate")}
        keys |= {"att.ln_x.weight": (C,), "att.ln_x.bias": (C,)}
        keys |= {"ffn.time_maa_k": (1, 1, C), "ffn.time_maa_r": (1, 1, C)}
        return keys | {"ffn.key.weight": (F, C), "ffn.receptance.weight": (C, C), "ffn.value.weight": (C, F)}

    def init_values(self, config: ModelConfig, layer: int) -> dict[str, torch.Tensor]:
        """maa = 1 - Eagle's mixes (x and w as k); decay and bonus as Eagle's; ffn maa 1 - ddd^(r10^3)."""
        r01, r10, ddd, frac, zig = rwkv_lm_ramps(config, layer)
        H, N, C = config.n_head, config.head_size, config.n_embd
        mk, mv, mr = 1 - ddd**r10, 1 - (ddd**r10 + 0.3 * r01), 1 - ddd ** (0.5 * r10)
        out = {"att.time_maa_x": mk, "att.time_maa_w": mk, "att.time_maa_k": mk}
        out |= {"att.time_maa_v": mv, "att.time_maa_r": mr, "att.time_maa_g": mr}
        out["att.time_decay"] = (-6 + 5 * frac ** (0.7 + 1.3 * r01)).view(1, 1, C)
        out["att.time_faaaa"] = (r01 * (1 - frac) + zig * 0.1).view(H, N)
        out |= ln_x_init(config, layer)
        ffn = 1 - ddd ** (r10**3)
        return out | {"ffn.time_maa_k": ffn, "ffn.time_maa_r": ffn}

    def init_random(self, name: str, shape: torch.Size, gen: torch.Generator | None) -> torch.Tensor | None:
        """The LoRAs: w1 zero, w2 U(+-0.01), so that they start as no-ops."""
        if name in ("time_maa_w1", "time_decay_w1"):
            return torch.zeros(shape)
        if name in ("time_maa_w2", "time_decay_w2"):
            return torch.empty(shape).uniform_(-0.01, 0.01, generator=gen)
        return None

    def random_param(self, name: str, shape: tuple[int, ...], uniform: Uniform) -> torch.Tensor | None:
        """LoRAs large enough to make the decay and token shift genuinely data-dependent."""
        if name == "time_maa_w1" or name == "time_decay_w1":
            return uniform(shape, -0.5, 0.5) / shape[0] ** 0.5 * 4
        if name == "time_maa_w2":
            return uniform(shape, -0.5, 0.5) / shape[1] ** 0.5
        if name == "time_decay_w2":
            return uniform(shape, -1.0, 1.0) / shape[0] ** 0.5 * 2
        if name.startswith("time_maa"):
            return uniform(shape, 0.0, 1.0)
        if name == "time_decay":  # log(-log w): -6 .. 1.5, the LoRA adds data-dependent swings
            return uniform(shape, -6.0, 1.5)
        return uniform(shape, -1.0, 1.0) if name == "time_faaaa" else None

    def wkv_kernel(self, model: nn.Module) -> tuple[str, str]:
        return native_wkv_kernel(model, fused_epilogue=True)

    def native_header(self, config: ModelConfig) -> list[int]:
        return [config.mix_lora, config.decay_lora]  # plan_t's D, Dw

    def native_layer(self, plan: Any, block: nn.Module) -> None:
        """_decode_cpu.c's layer_t for Finch: maa_x and maa[w, k, v, r, g], the four LoRAs."""
        C = block.ln1.weight.numel()
        att, ffn = plan.own(block, "att"), plan.own(block, "ffn")
        D, Dw = att.mix_lora, att.time_decay_w1.shape[1]
        for ln in ("ln1", "ln2"):
            plan.vec(plan.own(block, ln), "weight", C)
            plan.vec(getattr(block, ln), "bias", C)
        for m in "xwkvrg":
            plan.vec(att, f"time_maa_{m}", C)
        plan.vec(att, "time_decay", C)
        plan.vec(att, "time_faaaa", C)
        plan.vec(plan.own(att, "ln_x"), "weight", C)
        plan.vec(att.ln_x, "bias", C)
        plan.vec(ffn, ffn.mix_k_name, C)
        plan.vec(ffn, ffn.mix_r_name, C)
        plan.lora(att, "time_maa_w1", 5 * D, C)
        plan.lora(att, "time_maa_w2", C, D, stacked=5)  # [5, D, C]: the C side takes slice j
        plan.lora(att, "time_decay_w1", Dw, C)
        plan.lora(att, "time_decay_w2", C, Dw)
        for name in ("receptance", "key", "value", "gate", "output"):
            plan.matrix(att, name)
        for name in ("key", "receptance", "value"):
            plan.matrix(ffn, name)


SPEC = RWKV6()
