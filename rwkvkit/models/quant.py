"""Weight-only int8 quantisation for fast CPU decode.

Decoding one token reads every weight once, so decode speed is bytes per token over memory
bandwidth: int8 weights read a quarter of fp32's bytes. Each output row gets its own scale
(symmetric, absmax / 127); the matrix-vector product runs in ``torch._weight_int8pack_mm`` with bf16
activations (fast on CPU) and returns bf16. The WKV state,
LayerNorms and decays are untouched (fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Linear


class Int8Linear(nn.Module):
    """Per-output-row symmetric int8 weights with bf16 scales: x [..., in] -> [..., out] bf16."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        # round the scale to bf16 FIRST and quantise against the rounded value, so the stored scale
        # carries no systematic per-row error
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127.0).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp_(-128, 127).to(torch.int8)
        self.register_buffer("weight_int8", q.contiguous())
        self.register_buffer("scale", scale)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    compute_dtype = torch.bfloat16  # activations go in as bf16

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight (for inspection and export; not used by forward)."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(x2, self.weight_int8, self.scale)
        return out.view(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every rwkvkit ``Linear`` (time-mix, channel-mix and head matrices) with ``Int8Linear``."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Linear)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(mod.weight))
    return model
