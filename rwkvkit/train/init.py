"""RWKV-LM's initialisation (``generate_init_weight`` plus the blocks' ``__init__``) for v4, v5.2, v6.

Applied in place to an ``rwkvkit.models.RWKV`` whose parameter names are the official checkpoint
keys. Per layer ``l`` of ``L``, with ``r01 = l/(L-1)``, ``r10 = 1 - l/L``, ``ddd_i = i/C``:

- matrices: ``emb`` U(+-1e-4); ``head`` orthogonal, gain ``0.5*sqrt(V/C)``; ``att.output``,
  ``ffn.value``, ``ffn.receptance`` zero (v4 also ``att.key``, ``att.receptance``); ``att.key`` and
  ``att.gate`` orthogonal gain 0.1 (v5/v6); the others orthogonal with gain ``sqrt(out/in)`` when
  ``out > in``.
- token shift: v4/v5 ``time_mix_k = ddd^r10``, ``_v = ddd^r10 + 0.3 r01``, ``_r = _g = ddd^(0.5 r10)``;
  v6 ``time_maa_* = 1 -`` the same (``x`` and ``w`` as ``k``); ffn v4/v5 ``ddd^r10``, v6 ``1 - ddd^(r10^3)``.
- decay: v5/v6 ``-6 + 5 (n/(C-1))^(0.7 + 1.3 r01)``; v4 ``-5 + 8 (...)``; bonus v5/v6
  ``r01 (1 - n/(C-1)) + ((n+1)%3 - 1) * 0.1``, v4 ``log(0.3) + ((n+1)%3 - 1) * 0.5``.
- Finch LoRAs: ``w1 = 0``, ``w2`` U(+-0.01) (``w1 = 0`` makes them start as no-ops).
- ``ln_x.weight = ((l+1)/L)^0.7``; LayerNorms weight 1, bias 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_ZERO = (".att.output.", ".ffn.value.", ".ffn.receptance.")
_ZERO_V4 = _ZERO + (".att.key.", ".att.receptance.")
_SMALL = (".att.key.", ".att.gate.")


def _ratios(layer: int, n_layer: int) -> tuple[float, float]:
    r01 = layer / (n_layer - 1) if n_layer > 1 else 0.0
    return r01, 1.0 - layer / n_layer


def _time_params(version: int, layer: int, n_layer: int, C: int, H: int, N: int) -> dict[str, torch.Tensor]:
    """The block's ``att.time_*`` and ``ffn.time_*`` tensors, official shapes."""
    r01, r10 = _ratios(layer, n_layer)
    ddd = (torch.arange(C, dtype=torch.float64) / C).view(1, 1, C)
    n = torch.arange(C, dtype=torch.float64)
    frac = n / max(C - 1, 1)
    zig = ((n + 1) % 3 - 1).double()
    mk, mv, mr = ddd**r10, ddd**r10 + 0.3 * r01, ddd ** (0.5 * r10)
    out: dict[str, torch.Tensor] = {}
    if version == 4:
        out |= {"att.time_mix_k": mk, "att.time_mix_v": mv, "att.time_mix_r": mr}
        out["att.time_decay"] = -5 + 8 * frac ** (0.7 + 1.3 * r01)
        out["att.time_first"] = math.log(0.3) + zig * 0.5
        out |= {"ffn.time_mix_k": ddd**r10, "ffn.time_mix_r": ddd**r10}
        return out
    decay = -6 + 5 * frac ** (0.7 + 1.3 * r01)
    out["att.time_faaaa"] = (r01 * (1 - frac) + zig * 0.1).view(H, N)
    if version == 5:
        out |= {"att.time_mix_k": mk, "att.time_mix_v": mv, "att.time_mix_r": mr, "att.time_mix_g": mr}
        out["att.time_decay"] = decay.view(H, N)
        out |= {"ffn.time_mix_k": ddd**r10, "ffn.time_mix_r": ddd**r10}
        return out
    out |= {"att.time_maa_x": 1 - mk, "att.time_maa_w": 1 - mk, "att.time_maa_k": 1 - mk}
    out |= {"att.time_maa_v": 1 - mv, "att.time_maa_r": 1 - mr, "att.time_maa_g": 1 - mr}
    out["att.time_decay"] = decay.view(1, 1, C)
    out |= {"ffn.time_maa_k": 1 - ddd ** (r10**3), "ffn.time_maa_r": 1 - ddd ** (r10**3)}
    return out


@torch.no_grad()
def init_weights(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Overwrite every parameter of ``model`` (an ``rwkvkit.models.RWKV``) with RWKV-LM's init; returns it."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    L, C, H, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size
    params = dict(model.named_parameters())
    time_vals = {}
    for layer in range(L):
        for k, v in _time_params(cfg.version, layer, L, C, H, N).items():
            time_vals[f"blocks.{layer}.{k}"] = v
    zero = _ZERO_V4 if cfg.version == 4 else _ZERO
    for name, p in params.items():
        if name in time_vals:
            val = time_vals[name]
            if tuple(val.shape) != tuple(p.shape):
                raise ValueError(f"init: {name} has shape {tuple(p.shape)}, recipe gives {tuple(val.shape)}")
            p.copy_(val.to(p.dtype))
        elif name.endswith(("time_maa_w1", "time_decay_w1")):
            p.zero_()
        elif name.endswith(("time_maa_w2", "time_decay_w2")):
            p.copy_(torch.empty(p.shape).uniform_(-0.01, 0.01, generator=gen).to(p.dtype))
        elif ".ln_x." in name:
            layer = int(name.split(".")[1])
            p.fill_(((layer + 1) / L) ** 0.7 if name.endswith("weight") else 0.0)
        elif "ln" in name.split(".")[-2]:  # ln0, ln1, ln2, ln_out
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name == "emb.weight":
            p.copy_(torch.empty(p.shape).uniform_(-1e-4, 1e-4, generator=gen).to(p.dtype))
        elif p.dim() == 2:
            dotted = "." + name
            if any(z in dotted for z in zero):
                p.zero_()
                continue
            gain = math.sqrt(p.shape[0] / p.shape[1]) if p.shape[0] > p.shape[1] else 1.0
            if name == "head.weight":
                gain *= 0.5
            elif cfg.version != 4 and any(s in dotted for s in _SMALL):
                gain *= 0.1
            w = torch.empty(p.shape, dtype=torch.float32)
            nn.init.orthogonal_(w, gain=gain, generator=gen)
            p.copy_(w.to(p.dtype))
        else:
            raise ValueError(f"init: no rule for parameter {name} of shape {tuple(p.shape)}")
    return model
