"""Weight-only int8 quantisation for fast CPU decode.

Decoding one token reads every weight once, so decode speed is bytes per token over memory
bandwidth: int8 weights read a quarter of fp32's bytes. The layout is ggml's Q8_0: every block of 32
inputs of an output row has its own float16 scale (symmetric, absmax / 127), 34 bytes per 32 weights.
Activations are not quantised: decode products run on float32 inputs in ``rwkvkit.ops._decode_cpu``;
a long prompt instead dequantises each matrix to bf16 and uses the bf16 matmul. The WKV state, LayerNorms, decays and the Finch LoRAs are untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import decode as native
from ..ops import matmul
from .common import Linear

_GEMV_MAX_ROWS = 32  # up to this many input rows, products read the int8 weights directly
_FEW_ROWS = 4  # up to this many, with float32 products of the rows as they are


class Int8Linear(nn.Module):
    """Q8_0 weights (int8 [out, in], fp16 scale per 32 inputs): x [..., in] -> [..., out] bf16.

    A few rows (decode) multiply the int8 weights by float32 inputs directly; more rows (a prompt)
    dequantise the matrix to bf16 and take the bf16 matmul, like a bf16 model. Element-wise work
    between matrices runs in bf16 (``compute_dtype``), as in a bf16 model; the native one-token step
    keeps everything float32.
    """

    compute_dtype = torch.bfloat16

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        N, K = w.shape
        if K % native.Q8_BLOCK:
            raise ValueError(f"int8 needs in_features divisible by {native.Q8_BLOCK}, got {K}")
        blocks = w.view(N, K // native.Q8_BLOCK, native.Q8_BLOCK)
        # round the scale to fp16 FIRST and quantise against the rounded value
        scale = (blocks.abs().amax(dim=-1) / 127.0).clamp(max=65504.0).to(torch.float16)
        s = scale.float().unsqueeze(-1)
        q = torch.where(s > 0, torch.round(blocks / s.clamp_min(1e-30)), 0.0).clamp_(-127, 127)
        self.register_buffer("weight_int8", q.to(torch.int8).view(N, K).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.in_features, self.out_features = K, N

    def _apply(self, fn, recurse=True):  # .to(device) moves the scales; dtype casts leave them fp16
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.weight_int8.device)
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight, float32 (for inspection and export; not used by forward)."""
        q = self.weight_int8.view(self.out_features, -1, native.Q8_BLOCK).float()
        return (q * self.scale.float().unsqueeze(-1)).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if native.available() and x.device.type == "cpu":
            if x2.shape[0] <= _GEMV_MAX_ROWS:
                # bf16 rows beyond a few: the batched step's kernel (the matrix dequantised to bf16 as a
                # long prompt's, exact products of the bf16 rows, fp32 sums; 2x the fp32-row kernel here)
                bf16_rows = x2.dtype == torch.bfloat16 and x2.shape[0] > _FEW_ROWS
                out = native.q8_matmul(x2, self.weight_int8, self.scale, act_bf16=bf16_rows).to(
                    torch.bfloat16
                )
            else:
                w, xb = native.q8_dequantize_bf16(self.weight_int8, self.scale), x2.to(torch.bfloat16)
                no_grad = not (torch.is_grad_enabled() and x2.requires_grad)
                out = matmul.linear(xb, w) if no_grad and matmul.applies(xb, w) else F.linear(xb, w)
        else:  # no native kernels (or another device): dequantise and multiply
            out = F.linear(x2.float(), self.weight.to(x2.device)).to(torch.bfloat16)
        return out.view(*shape[:-1], self.out_features)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every rwkvkit ``Linear`` (time-mix, channel-mix and head matrices) with ``Int8Linear``."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Linear)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(mod.weight))
    return model
