"""Goose (RWKV-7, x070): the generalised delta rule with vector decay, an in-context learning rate and
a value residual from layer 0, and its declarations.

Time-mix of one token (``prev`` the previous token's normalised input, all six mixes static):
``x_j = x + (prev - x) * x_j`` for j in r, w, k, v, a, g; ``r, k, v = Wr x_r, Wk x_k, Wv x_v``;
``a = sigmoid(a0 + (x_a @ a1) @ a2)`` (the in-context learning rate); ``g = sigmoid(x_g @ g1) @ g2``;
``kk = L2-normalise(k * k_k)`` per head; ``k = k * (1 + (a - 1) * k_a)``; layer 0 keeps its ``v`` as
``v_first`` (passed down the layers of one call through ``carry``; not state), later layers mix it in:
``v = v + (v_first - v) * sigmoid(v0 + (x_v @ v1) @ v2)``. Log decay ``w = -exp(-0.5) * sigmoid(w0 +
tanh(x_w @ w1) @ w2)`` in fp32. The WKV (``rwkvkit.ops.wkv7``, state [value, key] as the reference)
runs with ``a = -kk``, ``b = kk * a``; then GroupNorm ``ln_x``, the bonus ``sum_head(r * k * r_k) * v``,
and ``out = Wo(y * g)``. Channel-mix: ``out = Wv(relu(Wk (x + (prev - x) * x_k))^2)``, no receptance.

Numerics: the residual, decays, the in-context rate, kk and the WKV inputs are fp32; the matrices and
LoRAs run in the model's dtype (an fp32 model is fp32 throughout, as the reference's ``cpu fp32``).
Block 0's ``v0/v1/v2`` exist in the official files but are never used: they are buffers there (loaded,
saved, not trained), so DDP and the optimiser see no parameter without a gradient.

CPU inference (``fusable``): the block computes ln1 and the six mixes in one C pass
(``shift_mix_spec``), the channel-mix its mix, relu^2 and residual add in fused passes; a prompt
runs the matrices and LoRAs, then everything between them and the output matrix in one C pass per
(row, head) (``ops/wkv7_fused.py``: kk, the rate, the value residual, the decay, the WKV step,
GroupNorm, bonus, gate); one token takes Goose's own native step (``rwkv7_step.py``,
``native_step``), whose layer does not fit Finch's plan. The PyTorch code below is the definition
of the math, and runs whenever those do not apply (training, other devices, fp16, switched off).

``RWKV7`` declares the rest (``spec.Version``): detection (``att.r_k``; DeepEmbed files refused), the
LoRA widths read from the shapes, the keys, the state and ``time_state`` layout, RWKV-LM's
initialisation (``RWKV-v7/train_temp``) and learning-rate multiplier (``w0`` at 2x).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CheckpointError, ModelConfig
from ..ops import decode_v7, fused, wkv7_fused, wkv7_native
from ..ops.wkv7 import wkv7
from .common import Linear, compute_dtype, fusable, group_norm, ln_x_init, lora_mm, make_ln_x, token_shift
from .spec import CHUNKED, StateSlot, TimeStateLayout, Uniform, Version, per_head_matrix, rwkv_lm_ramps

MIXES = "rwkvag"  # the order of the time-mix's token-shift mixes x_r .. x_g
_DECAY_SCALE = math.exp(-0.5)  # w = -exp(-0.5) * sigmoid(.): each step's decay factor in [0.545, 1)
_LORAS = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")


class TimeMix7(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 1) -> None:
        super().__init__()
        C, H, N = config.n_embd, config.n_head, config.head_size
        self.n_head, self.head_size, self.first = H, N, layer == 0
        for m in MIXES:
            setattr(self, f"x_{m}", nn.Parameter(torch.zeros(1, 1, C)))
        for name, width in (("w", config.decay_lora), ("a", config.a_lora), ("v", config.v_lora)):
            tensors = (torch.zeros(1, 1, C), torch.zeros(C, width), torch.zeros(width, C))
            for j, t in enumerate(tensors):
                if name == "v" and self.first:  # in the file, unused: not trained
                    self.register_buffer(f"v{j}", t)
                else:
                    setattr(self, f"{name}{j}", nn.Parameter(t))
        self.g1 = nn.Parameter(torch.zeros(C, config.gate_lora))
        self.g2 = nn.Parameter(torch.zeros(config.gate_lora, C))
        self.k_k = nn.Parameter(torch.zeros(1, 1, C))
        self.k_a = nn.Parameter(torch.zeros(1, 1, C))
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = Linear(C, C)
        self.key = Linear(C, C)
        self.value = Linear(C, C)
        self.output = Linear(C, C)
        self.ln_x = make_ln_x(config)

    def shift_mix_spec(
        self, x: torch.Tensor, shift: torch.Tensor, wkv_state: tuple[torch.Tensor]
    ) -> tuple[torch.Tensor, bool, torch.dtype] | None:
        """The six token-shift mixes as ``(mix [6, C], lerp=False, dtype)`` for ``fused.shift_mix``, or
        None when the fused path does not apply (then ``forward`` takes no ``mixed``)."""
        cdt = compute_dtype(self.receptance)
        if not fusable(self, x, cdt, inputs=(shift, *wkv_state)):
            return None
        return torch.cat([getattr(self, f"x_{m}") for m in MIXES]).view(len(MIXES), -1).float(), False, cdt

    def forward(
        self,
        x: torch.Tensor,
        shift: torch.Tensor,
        wkv_state: tuple[torch.Tensor],
        backend: str,
        mixed: torch.Tensor | None = None,
        carry: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor]]:
        """x [B, T, C] normalised fp32; shift [B, C]; wkv_state (wkv [B, H, N, N] fp32, value x key,).
        ``mixed``: the six mixes [6, B, T, C] of ``shift_mix_spec`` already computed (the block fuses them
        with ln1). ``carry``: the dict of this call's layers; layer 0 puts ``v_first`` there."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        (state,) = wkv_state
        cdt = compute_dtype(self.receptance)
        if mixed is None:
            spec = self.shift_mix_spec(x, shift, wkv_state)
            if spec is not None:
                mixed = fused.shift_mix(x, shift, spec[0], lerp=False, dtype=cdt)
            else:
                d = token_shift(x, shift) - x
                mix = torch.stack([getattr(self, f"x_{m}") for m in MIXES]).float()  # [6, 1, 1, C]
                mixed = torch.addcmul(x, d, mix).to(cdt)
        xr, xw, xk, xv, xa, xg = mixed.unbind(0)
        if backend in ("auto", "native") and self._fused_applies(x, state, carry, cdt):
            return self._forward_fused(x, state, mixed, carry, cdt)
        r = self.receptance(xr)
        k = self.key(xk).float()
        v = self.value(xv).float()
        z = self.w0.float() + lora_mm(torch.tanh(lora_mm(xw, self.w1)), self.w2).float()
        w = torch.sigmoid(z) * -_DECAY_SCALE  # log decay, fp32
        a = torch.sigmoid(self.a0.float() + lora_mm(lora_mm(xa, self.a1), self.a2).float())
        g = lora_mm(torch.sigmoid(lora_mm(xg, self.g1)), self.g2)
        kk = F.normalize((k * self.k_k.float()).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a.float())
        v = self._value_residual(v, xv, carry)
        a4 = a.view(B, T, H, N)
        y, s = wkv7(
            r.view(B, T, H, N), w.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N),
            -kk, kk * a4, state, backend=backend,
        )  # fmt: skip
        y = group_norm(y.reshape(B, T, C), H, self.ln_x)
        bonus = (r.float().view(B, T, H, N) * k.view(B, T, H, N) * self.r_k.float()).sum(-1, keepdim=True)
        y = y + (bonus * v.view(B, T, H, N)).view(B, T, C)
        return self.output(y * g), x[:, -1], (s,)

    def _fused_applies(
        self, x: torch.Tensor, state: torch.Tensor, carry: dict | None, cdt: torch.dtype
    ) -> bool:
        """Whether the element-wise work between the matrices runs in ``_wkv7_fused.c``: CPU inference
        with the fused kernels chosen and built, fp32 or bf16, a prompt (one token goes to the native
        step, or to the code below)."""
        return (
            x.shape[1] > 1
            and carry is not None
            and wkv7_fused.available()
            and fusable(self, x, cdt, compute_dtype(self.output), inputs=(state,))
            and fused.plain(*self.parameters(), *self.buffers())
        )

    def _forward_fused(
        self, x: torch.Tensor, state: torch.Tensor, mixed: torch.Tensor, carry: dict, cdt: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor]]:
        """``forward`` from the mixes on, with every element-wise step in one C pass per (row, head)."""
        xr, xw, xk, xv, xa, xg = mixed.unbind(0)
        mats = {"r": self.receptance(xr), "k": self.key(xk), "v": self.value(xv)}
        mats["zw"] = lora_mm(torch.tanh(lora_mm(xw, self.w1)), self.w2)
        mats["za"] = lora_mm(lora_mm(xa, self.a1), self.a2)
        mats["zv"] = None if self.first else lora_mm(lora_mm(xv, self.v1), self.v2)
        mats["g"] = lora_mm(torch.sigmoid(lora_mm(xg, self.g1)), self.g2)
        params = {name: getattr(self, name) for name in ("w0", "a0", "v0", "k_k", "k_a", "r_k")}
        params |= {"lnx_w": self.ln_x.weight, "lnx_b": self.ln_x.bias}
        if not self.first and carry.get("v_first") is None:
            raise ValueError("RWKV-7: a later layer ran before layer 0 set the value residual")
        out, s, v_first = wkv7_fused.timemix(
            mats, params, state, None if self.first else carry["v_first"], compute_dtype(self.output)
        )
        if self.first:
            carry["v_first"] = v_first
        return self.output(out), x[:, -1], (s,)

    def _value_residual(self, v: torch.Tensor, xv: torch.Tensor, carry: dict | None) -> torch.Tensor:
        """Layer 0: remember v as ``carry["v_first"]``; later layers: mix ``v_first`` in."""
        if carry is None:
            raise ValueError("RWKV-7's time-mix needs the per-call carry dict (the model passes one)")
        if self.first:
            carry["v_first"] = v
            return v
        v_first = carry.get("v_first")
        if v_first is None:
            raise ValueError("RWKV-7: a later layer ran before layer 0 set the value residual")
        gate = torch.sigmoid(self.v0.float() + lora_mm(lora_mm(xv, self.v1), self.v2).float())
        return torch.addcmul(v, v_first - v, gate)


class ChannelMix7(nn.Module):
    """Goose's channel-mix: ``Wv(relu(Wk (x + (prev - x) * x_k))^2)`` (no receptance gate)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, F_ = config.n_embd, config.ffn_dim
        self.x_k = nn.Parameter(torch.zeros(1, 1, C))
        self.key = Linear(C, F_)
        self.value = Linear(F_, C)

    def shift_mix_spec(
        self, x: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, bool, torch.dtype] | None:
        """``(mix [1, C], lerp=False, dtype)`` for ``fused.shift_mix`` / ``fused.add_norm_mix``, or None
        when the fused path does not apply."""
        cdt = compute_dtype(self.key)
        if compute_dtype(self.value) != cdt or not fusable(self, x, cdt, inputs=(shift,)):
            return None
        if not fused.plain(self.x_k):
            return None
        return self.x_k.view(1, -1).float(), False, cdt

    def forward_mixed(self, mixed: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The fused path from the mix [1, B, T, C] on (compute dtype): the output fp32, or with
        ``residual`` (fp32, contiguous) that plus the output, in place."""
        (xk,) = mixed
        relu2 = getattr(self.key, "forward_relu2", None)  # a quantised key has none
        k = relu2(xk) if relu2 is not None else fused.relu_square_(self.key(xk))
        out = self.value(k)
        if residual is None:
            return out.float()
        return residual.add_(out)

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] normalised fp32, shift [B, C] -> (out [B, T, C], new shift [B, C])."""
        spec = self.shift_mix_spec(x, shift)
        if spec is not None:
            mix, lerp, cdt = spec
            return self.forward_mixed(fused.shift_mix(x, shift, mix, lerp=lerp, dtype=cdt)), x[:, -1]
        xk = torch.addcmul(x, token_shift(x, shift) - x, self.x_k.float())
        k = self.key(xk)
        k = torch.relu_(k).square_() if not k.requires_grad else torch.relu(k).square()
        return self.value(k), x[:, -1]


def lora_width(scale: float, n_embd: int, power: float = 0.5) -> int:
    """RWKV-LM's suggested LoRA width: ``max(32, round(scale * C^power / 32) * 32)``."""
    return max(32, int(round(scale * n_embd**power / 32)) * 32)


# RWKV-LM's suggestions as in the released x070 files (0.1B: 64, 64, 32, 128; 1.5B: 96, 96, 64, 256)
_WIDTHS = {"decay_lora": (1.8, 0.5), "a_lora": (1.8, 0.5), "v_lora": (1.3, 0.5), "gate_lora": (0.6, 0.8)}
_LORA_KEYS = {"decay_lora": "w1", "a_lora": "a1", "v_lora": "v1", "gate_lora": "g1"}


class RWKV7(Version):
    version = 7
    name = "Goose (RWKV-7)"
    short = "Goose"
    time_mix = TimeMix7
    channel_mix = ChannelMix7
    sizes = {"decay_lora": 64, "a_lora": 64, "v_lora": 32, "gate_lora": 128}  # defaults: C = 768
    matrix_params = _LORAS
    recurrent = (StateSlot("wkv", per_head_matrix),)  # [H, N, N], value x key (the reference's layout)
    time_state = TimeStateLayout("wkv", transposed=False)  # state-tuned files store [value, key] too
    lr_mult = {"w0": 2.0}
    zero_init = ("att.output", "ffn.value")
    small_init = ("att.key",)
    init_gain_by_shape = False  # RWKV-LM's v7 init: orthogonal with gain 1 (x0.1, x0), whatever the shape
    fold_ln0_in_model_dtype = True  # the reference's x070 converts first, then folds ln0

    def time_mix_for(self, config: ModelConfig, layer: int) -> nn.Module:
        return TimeMix7(config, layer)

    def detect(self, sd: Mapping[str, torch.Tensor]) -> bool:
        """``att.r_k`` present; DeepEmbed files (``ffn.s_emb``, ``s0/s1/s2``) are refused."""
        if "blocks.0.att.r_k" not in sd:
            return False
        deep = sorted(k for k in sd if k.startswith("blocks.0.ffn.") and k.split(".")[3] in _DEEP_EMBED)
        if deep:
            raise CheckpointError(
                f"this is an RWKV-7 DeepEmbed checkpoint ({', '.join(deep)}): rwkvkit supports plain x070 "
                "files (DeepEmbed's channel-mix reads a per-token table of every layer, which rwkvkit's blocks "
                "do not take; run it with the rwkv package and RWKV_DE_VERSION=1)"
            )
        return True

    def read_sizes(self, sd: Mapping[str, torch.Tensor], n_embd: int) -> dict[str, int]:
        att = "blocks.0.att."
        rk = sd[att + "r_k"]
        if rk.dim() != 2 or rk.shape[0] * rk.shape[1] != n_embd:
            raise CheckpointError(
                f"'{att}r_k' has shape {tuple(rk.shape)}: expected [n_head, head_size] with "
                f"n_head * head_size = n_embd {n_embd}"
            )
        out = {"head_size": rk.shape[1]}
        for size, key in _LORA_KEYS.items():
            t = sd.get(att + key)
            if t is None:
                raise CheckpointError(f"RWKV-7 checkpoint without '{att}{key}' (its {size} width)")
            if t.dim() != 2 or t.shape[0] != n_embd:
                raise CheckpointError(f"'{att}{key}' must be [n_embd, width], got {tuple(t.shape)}")
            out[size] = t.shape[1]
        return out

    def default_size(self, name: str, n_embd: int) -> int:
        scale, power = _WIDTHS[name]
        return lora_width(scale, n_embd, power)

    def layer_keys(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        C, F, H, N = config.n_embd, config.ffn_dim, config.n_head, config.head_size
        keys = {f"att.x_{m}": (1, 1, C) for m in MIXES}
        for name, width in (("w", config.decay_lora), ("a", config.a_lora), ("v", config.v_lora)):
            keys |= {f"att.{name}0": (1, 1, C), f"att.{name}1": (C, width), f"att.{name}2": (width, C)}
        keys |= {"att.g1": (C, config.gate_lora), "att.g2": (config.gate_lora, C)}
        keys |= {"att.k_k": (1, 1, C), "att.k_a": (1, 1, C), "att.r_k": (H, N)}
        keys |= {f"att.{m}.weight": (C, C) for m in ("receptance", "key", "value", "output")}
        keys |= {"att.ln_x.weight": (C,), "att.ln_x.bias": (C,)}
        return keys | {"ffn.x_k": (1, 1, C), "ffn.key.weight": (F, C), "ffn.value.weight": (C, F)}

    def init_values(self, config: ModelConfig, layer: int) -> dict[str, torch.Tensor]:
        """RWKV-LM's ``RWKV_Tmix_x070`` / ``RWKV_CMix_x070``: mixes 1 - ddd^(p r10) (p = 0.2, 0.9, 0.7,
        0.7, 0.9, 0.2 for r, w, k, v, a, g; ffn r10^4); with ``lin = n/(C-1) - 0.5`` and the per-head
        zigzag ``z|z|``, ``z = (n%N - (N-1)/2) / ((N-1)/2)``: w0 = -6 + 6 (n/(C-1))^(1 + r01^0.3) + 0.5 +
        2.5 zig, a0 = -0.19 + 0.3 zig + 0.4 lin, v0 = 0.73 - 0.4 lin, k_k = 0.71 - 0.1 lin, k_a = 1.02,
        r_k = -0.04; ln_x.weight ((l+1)/L)^0.7."""
        r01, r10, ddd, frac, _ = rwkv_lm_ramps(config, layer)
        C, H, N = config.n_embd, config.n_head, config.head_size
        lin = (frac - 0.5).view(1, 1, C)
        n = torch.arange(C, dtype=torch.float64)
        half = (N - 1) / 2
        zig = ((n % N) - half) / half if N > 1 else torch.zeros(C, dtype=torch.float64)
        zig = (zig * zig.abs()).view(1, 1, C)
        out = {f"att.x_{m}": 1 - ddd ** (p * r10) for m, p in zip(MIXES, (0.2, 0.9, 0.7, 0.7, 0.9, 0.2))}
        out["att.w0"] = (-6 + 6 * frac ** (1 + r01**0.3)).view(1, 1, C) + 0.5 + zig * 2.5
        out["att.a0"] = -0.19 + zig * 0.3 + lin * 0.4
        out["att.v0"] = 0.73 - lin * 0.4
        out["att.k_k"] = 0.71 - lin * 0.1
        out["att.k_a"] = torch.full((1, 1, C), 1.02, dtype=torch.float64)
        out["att.r_k"] = torch.full((H, N), -0.04, dtype=torch.float64)
        out |= ln_x_init(config, layer)
        return out | {"ffn.x_k": 1 - ddd ** (r10**4)}

    def init_random(self, name: str, shape: torch.Size, gen: torch.Generator | None) -> torch.Tensor | None:
        """The LoRAs: the first matrix zero, the second orthogonal with gain 0.1 (x sqrt(rows/cols) when
        taller than wide), so that each starts as its constant (w0, a0, v0) or zero."""
        if name in ("w1", "a1", "v1", "g1"):
            return torch.zeros(shape)
        if name in ("w2", "a2", "v2", "g2"):
            gain = 0.1 * (math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0)
            return nn.init.orthogonal_(torch.empty(shape), gain=gain, generator=gen)
        return None

    def random_param(self, name: str, shape: tuple[int, ...], uniform: Uniform) -> torch.Tensor | None:
        """Ranges like a trained file's: decays spread so that some channels forget in a few tokens and
        others hardly at all, LoRAs large enough to make every branch data-dependent."""
        if name.startswith("x_"):
            return uniform(shape, 0.0, 1.0)
        if name in ("w1", "a1", "v1", "g1"):
            return uniform(shape, -0.5, 0.5) / shape[0] ** 0.5 * 4
        if name in ("w2", "a2", "v2", "g2"):
            return uniform(shape, -1.0, 1.0) / shape[0] ** 0.5
        ranges = {"w0": (-5.0, 2.0), "a0": (-2.0, 1.0), "v0": (-1.0, 1.0), "k_k": (0.2, 1.2)}
        ranges |= {"k_a": (0.5, 1.5), "r_k": (-0.5, 0.5)}
        lo_hi = ranges.get(name)
        return None if lo_hi is None else uniform(shape, *lo_hi)

    def native_step(self, model: nn.Module) -> Any:
        """Goose's own one-call step (``rwkv7_step.py``, ``_decode_v7.c``): its layer does not fit
        ``_decode_cpu.c``'s plan."""
        from . import rwkv7_step

        return rwkv7_step.NativeStep7(model)

    def native_step_built(self) -> bool:
        return decode_v7.available()

    def native_step_kernel(self) -> str:
        from . import rwkv7_step

        return rwkv7_step.kernel()

    def wkv_kernel(self, model: nn.Module) -> tuple[str, str]:
        if model.device.type == "cpu":
            if wkv7_fused.available() and model.kernels.fused:
                return "prompts: one C pass per (row, head) with the time-mix around it (_wkv7_fused)", ""
            why = "the _wkv7_fused extension is not built" if model.kernels.fused else "kernels.fused=False"
            if wkv7_native.available():
                return (
                    "native C recurrence (_wkv7_cpu), GroupNorm, bonus and gate after it",
                    f"fused time-mix: {why}",
                )
            return CHUNKED, "native WKV-7: the _wkv7_cpu extension is not built"
        from ..ops import fla_kernels as fla

        if fla.available():
            return "flash-linear-attention's chunked kernel; one token: the per-step loop", ""
        return CHUNKED, f"flash-linear-attention is not installed ({fla.INSTALL})"


_DEEP_EMBED = ("s_emb", "s_emb_x", "s0", "s1", "s2")

SPEC = RWKV7()
