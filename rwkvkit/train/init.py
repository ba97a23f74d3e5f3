"""RWKV-LM's initialisation (``generate_init_weight`` plus the blocks' ``__init__``), for every version.

Applied in place to an ``rwkvkit.models.RWKV`` whose parameter names are the official checkpoint
keys. The rules common to every version live here; each version declares its own (``Version``:
``init_values``, ``init_random``, ``zero_init``, ``small_init``; see ``rwkvkit/models/rwkv*.py``):

- ``emb`` U(+-1e-4); ``head`` orthogonal, gain ``0.5*sqrt(V/C)``; LayerNorms weight 1, bias 0;
- matrices orthogonal with gain ``sqrt(out/in)`` when ``out > in`` (gain 1 whatever the shape
  where the version's ``init_gain_by_shape`` is False: RWKV-7); the version's ``zero_init``
  matrices zero (``att.output``, ``ffn.value``, ``ffn.receptance``, ...), its ``small_init`` ones
  with gain 0.1 (``att.key``, Eagle/Finch ``att.gate``);
- the version's own parameters (token-shift mixes, decays, bonuses, ``ln_x``) from its
  ``init_values`` and, for random non-matrix ones (the LoRAs), its ``init_random``; buffers a
  version keeps in the file but does not train (RWKV-7's block-0 ``v0/v1/v2``) take the same rules.

Parameters (then such buffers) are visited in the model's order, drawing from one generator, so a
seed reproduces a model.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def init_weights(model: nn.Module, seed: int | None = None) -> nn.Module:
    """Overwrite every parameter of ``model`` (an ``rwkvkit.models.RWKV``) with RWKV-LM's init; returns it."""
    cfg = model.config
    spec = cfg.spec
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    values = {}
    for layer in range(cfg.n_layer):
        for k, v in spec.init_values(cfg, layer).items():
            values[f"blocks.{layer}.{k}"] = v
    zero = tuple(f".{name}." for name in spec.zero_init)
    small = tuple(f".{name}." for name in spec.small_init)
    buffers = [(n, b) for n, b in model.named_buffers() if n in values or spec.is_matrix(n)]
    for name, p in [*model.named_parameters(), *buffers]:
        own = values.get(name)
        if own is None:
            own = spec.init_random(name.rsplit(".", 1)[-1], p.shape, gen)
        if own is not None:
            if tuple(own.shape) != tuple(p.shape):
                raise ValueError(f"init: {name} has shape {tuple(p.shape)}, recipe gives {tuple(own.shape)}")
            p.copy_(own.to(p.dtype))
        elif "ln" in name.split(".")[-2]:  # ln0, ln1, ln2, ln_out
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name == "emb.weight":
            p.copy_(torch.empty(p.shape).uniform_(-1e-4, 1e-4, generator=gen).to(p.dtype))
        elif p.dim() == 2:
            dotted = "." + name
            if any(z in dotted for z in zero):
                p.zero_()
                continue
            by_shape = (
                spec.init_gain_by_shape or name == "head.weight"
            )  # head: 0.5 sqrt(V/C) in every version
            gain = math.sqrt(p.shape[0] / p.shape[1]) if p.shape[0] > p.shape[1] and by_shape else 1.0
            if name == "head.weight":
                gain *= 0.5
            elif any(s in dotted for s in small):
                gain *= 0.1
            w = torch.empty(p.shape, dtype=torch.float32)
            nn.init.orthogonal_(w, gain=gain, generator=gen)
            p.copy_(w.to(p.dtype))
        else:
            raise ValueError(f"init: no rule for parameter {name} of shape {tuple(p.shape)}")
    return model
