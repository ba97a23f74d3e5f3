"""Pieces shared by every RWKV version: the dtype-aware Linear, token shift, LayerNorm, channel-mix.

Numerics (the same in every version, chosen to match the reference in fp32 and to lose as little as
possible in bf16/fp16): the residual stream, LayerNorms, decays, the WKV state and GroupNorm are fp32;
only the matrices (``Linear`` weights, the Finch LoRAs, the embedding and the head) take the model's
dtype. A ``Linear`` casts its input to its weight's dtype and returns that dtype (float32 models stay
float32 throughout); element-wise work between two matrices stays in the compute dtype, as in the
reference, and a quantised layer (``rwkvkit.models.quant.Int8Linear``) can stand in for a ``Linear``.

CPU inference runs the element-wise chains between the matrices through the fused C kernels of
``rwkvkit.ops.fused`` when they apply (``fusable``), and bf16 prompts' matrices through the AMX kernel
of ``rwkvkit.ops.matmul`` (with the channel-mix's relu^2 and its gated residual add as epilogues); the
PyTorch code next to each call is the fallback (training, other devices, fp16, the extension not
built) and the definition of the math.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CheckpointError, ModelConfig
from ..ops import decode, fused, matmul

_ROW_KERNEL = decode.available()  # the native step's matrix-vector kernels are built
_FEW_ROWS = 4  # up to this many rows, bf16 products take them (measured: faster than oneDNN's up to 4)
# and up to this many (a short prompt), the batched step's bf16-activation kernel: the rows are bf16
# already, so the products are exact and the sums fp32, as oneDNN's (measured, 1 thread, the 0.1B
# shapes: 1.3-2.2x faster than F.linear for 5-16 rows, slower from 24)
_SMALL_ROWS = 16
# fp16 prompts on the CPU: PyTorch's fp16 GEMM there is a scalar dot-product loop (~3 GFLOP/s on an
# AVX-512 CPU without AVX512-FP16; a 0.1B model prefilled ~160 tok/s). Blocks of the weight rows are
# widened to fp32 (exactly) and multiplied by oneDNN's fp32 GEMM instead, a block at a time so that the
# widened copy stays small (_WIDEN_BYTES); the output is rounded to fp16 as before.
_WIDEN_BYTES = 8 << 20


def _wants_grad(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether autograd would record ``x @ w``: the native and widening paths below run without it."""
    return torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)


class Linear(nn.Linear):
    """``nn.Linear`` without bias whose input is cast to the weight dtype (output in that dtype).

    fp16 on the CPU without gradients: up to 16 rows the native step's fp16 kernels, more: fp32 products
    of the widened weights (``_widened_linear``); both with fp32 sums of the fp16 inputs, rounded to fp16
    as PyTorch's fp16 GEMM (a scalar loop on CPUs: ~3 GFLOP/s). bf16 on the CPU without gradients: up to 16 rows take the native step's kernels (``torch.mv`` for
    one row without them), 32 rows or more (a prompt) the AMX
    kernel of ``rwkvkit.ops.matmul`` when it applies (built, AMX-BF16, N and K multiples of 32, chosen:
    ``Kernels.amx_matmul``); everything else F.linear.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype this layer wants its input in (and returns)."""
        return self.weight.dtype

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        return x

    def _amx(self, x: torch.Tensor) -> bool:
        """True when the AMX kernel takes x @ W^T: a prompt's rows, no gradient wanted, shapes it takes."""
        w = self.weight
        if x.numel() < 32 * x.shape[-1] or not matmul.applies(x, w):
            return False
        return not _wants_grad(x, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        w = self.weight
        x = self._cast(x)
        rows = x.numel() // max(x.shape[-1], 1)
        if rows <= _SMALL_ROWS and w.dtype == torch.bfloat16 and x.device.type == "cpu":
            # a few rows (a prompt's last-position logits, the last block's channel-mix of a last_only
            # prompt, decode outside the native step): the native step's matrix-vector kernels when
            # built (fp32 sums rounded once to bf16, as torch), about 1.3x torch.mv for one row and 2x
            # oneDNN's bf16 matmul for 2-4 rows; torch.mv reads one row twice as fast as F.linear
            if _ROW_KERNEL and not _wants_grad(x, w) and rows > 0 and decode.matrix_kind(w) is not None:
                y = decode.dense_matmul(x.reshape(rows, -1), w, act_bf16=rows > _FEW_ROWS).to(w.dtype)
                return y.view(*x.shape[:-1], w.shape[0])
            if rows == 1:
                return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
        if self._amx(x):
            return matmul.linear(x, w)
        if w.dtype == torch.float16 and x.device.type == "cpu" and rows > 0 and not _wants_grad(x, w):
            if rows <= _SMALL_ROWS and _ROW_KERNEL and decode.matrix_kind(w) is not None:
                y = decode.dense_matmul(x.reshape(rows, -1), w).to(w.dtype)  # fp16 x, exact in fp32
                return y.view(*x.shape[:-1], w.shape[0])
            return _widened_linear(x, w)
        return F.linear(x, w)

    def forward_relu2(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(self(x)) ** 2`` (the channel-mix's key), inference: in the AMX kernel's epilogue when
        it applies, else ``fused.relu_square_`` on ``self(x)`` (the same values up to the products'
        summation order)."""
        x = self._cast(x)
        if self._amx(x):
            return matmul.linear(x, self.weight, epilogue="relu2")
        return fused.relu_square_(self(x))

    def gated_residual_(self, res: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``res += sigmoid(r) * self(x)`` in place (the channel-mix's end; res fp32 contiguous, r in
        the compute dtype), inference: in the AMX kernel's epilogue when it applies (r bf16), else
        ``fused.sigmoid_mul_add_`` on ``self(x)`` (the same values up to the products' summation order)."""
        x = self._cast(x)
        if r.dtype == torch.bfloat16 and self._amx(x):
            return matmul.gated_residual_(res, x, self.weight, r)
        return fused.sigmoid_mul_add_(res, r, self(x))


def _widened_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` for fp16 ``x`` and ``w`` on the CPU, as fp32 products of blocks of ``w``'s rows
    widened to fp32 (exact), rounded to fp16 at the end: fp32 sums, as PyTorch's own fp16 GEMM."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    block = max(16, _WIDEN_BYTES // (4 * w.shape[1]))
    parts = [F.linear(x2, w[n : n + block].float()) for n in range(0, w.shape[0], block)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return y.to(torch.float16).view(*x.shape[:-1], w.shape[0])


def lora_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x.to(w.dtype) @ w``: a LoRA's product (``w`` [in, out]). fp16 on the CPU without gradients runs
    as fp32 products of the widened operands (exact widenings, fp32 sums as PyTorch's own fp16 GEMM,
    which is a scalar loop there), rounded back to fp16."""
    x = x.to(w.dtype)
    if w.dtype == torch.float16 and x.device.type == "cpu" and not _wants_grad(x, w):
        return (x.float() @ w.float()).to(torch.float16)
    return x @ w


class LayerNorm(nn.LayerNorm):
    """fp32 LayerNorm (eps 1e-5) over the last dimension, whatever the input dtype."""

    def __init__(self, n: int) -> None:
        super().__init__(n, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        )


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a matrix layer wants its input in: its own ``compute_dtype`` or its weight's dtype."""
    dt = getattr(layer, "compute_dtype", None)
    return dt if dt is not None else layer.weight.dtype


def fusable(
    module: nn.Module, x: torch.Tensor, *dtypes: torch.dtype, inputs: tuple[torch.Tensor, ...] = ()
) -> bool:
    """True when ``module`` may run its fused CPU kernels on input ``x``: built and enabled, x on the
    CPU, no gradient wanted (of x, of the other ``inputs`` such as a tuned state, or of any of the
    module's parameters) and every dtype in ``dtypes`` (the compute dtypes involved) one the kernels
    read and write."""
    if not all(dt in fused.DTYPES for dt in dtypes) or not fused.usable(x):
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(t.requires_grad for t in inputs) and not any(p.requires_grad for p in module.parameters())


def token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The previous token's input at every position: [B, T, C] from x [B, T, C] and prev [B, C]."""
    if x.shape[1] == 1:
        return prev.unsqueeze(1).to(x.dtype)
    return torch.cat([prev.unsqueeze(1).to(x.dtype), x[:, :-1]], dim=1)


class ChannelMix(nn.Module):
    """The feed-forward half of a block: ``sigmoid(Wr xr) * Wv(relu(Wk xk)^2)`` with token shift.

    RWKV-4/5 lerp as ``x*mix + prev*(1-mix)`` (``time_mix_k/r``, ``LERP = True``); Finch as
    ``x + (prev-x)*maa`` (``time_maa_k/r``: its subclass sets ``MIX`` and ``LERP = False``). The two
    are the same function of the parameters, so one module serves both.
    """

    MIX = "time_mix"  # the mix parameters are MIX_k and MIX_r
    LERP = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, F_ = config.n_embd, config.ffn_dim
        self.mix_k_name, self.mix_r_name = f"{self.MIX}_k", f"{self.MIX}_r"
        self.register_parameter(self.mix_k_name, nn.Parameter(torch.zeros(1, 1, C)))
        self.register_parameter(self.mix_r_name, nn.Parameter(torch.zeros(1, 1, C)))
        self.key = Linear(C, F_)
        self.receptance = Linear(C, C)
        self.value = Linear(F_, C)

    def mixes_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and receptance mix parameters."""
        return getattr(self, self.mix_k_name), getattr(self, self.mix_r_name)

    def shift_mix_spec(
        self, x: torch.Tensor, shift: torch.Tensor
    ) -> tuple[torch.Tensor, bool, torch.dtype] | None:
        """The token-shift mixes the fused path starts with, as ``(mix [2, C], lerp, dtype)`` for
        ``fused.shift_mix`` / ``fused.add_norm_mix``, or None when the fused path does not apply."""
        cdt = compute_dtype(self.key)
        same = compute_dtype(self.receptance) == compute_dtype(self.value) == cdt
        params = self.mixes_params()
        if not (same and fusable(self, x, cdt, inputs=(shift,)) and fused.plain(*params)):
            return None
        return torch.cat(params).view(2, -1), self.LERP, cdt

    def forward_mixed(self, mixed: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The fused path from the two mixes [2, B, T, C] on (in the compute dtype):
        ``sigmoid(Wr xr) * Wv(relu(Wk xk)^2)`` in fp32; with ``residual`` (fp32, contiguous) that is
        added to it in place and returned."""
        xk, xr = mixed
        relu2 = getattr(self.key, "forward_relu2", None)  # a quantised key has none
        k = relu2(xk) if relu2 is not None else fused.relu_square_(self.key(xk))
        r = self.receptance(xr)
        if residual is None:
            return fused.sigmoid_mul(r, self.value(k), torch.float32)
        gated = getattr(self.value, "gated_residual_", None)  # a quantised value has none
        if gated is not None:
            return gated(residual, k, r)
        return fused.sigmoid_mul_add_(residual, r, self.value(k))

    def forward(self, x: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] normalised fp32, shift [B, C] -> (out [B, T, C] fp32, new shift [B, C])."""
        spec = self.shift_mix_spec(x, shift)
        if spec is not None:
            # mixes straight to the compute dtype, relu^2 in place, sigmoid(r) * v in one pass; the
            # output is stored fp32 (the same values) so the caller's residual add needs no cast
            mix, lerp, cdt = spec
            return self.forward_mixed(fused.shift_mix(x, shift, mix, lerp=lerp, dtype=cdt)), x[:, -1]
        mk, mr = self.mixes_params()
        prev = token_shift(x, shift)
        if self.LERP:
            xk, xr = x * mk + prev * (1 - mk), x * mr + prev * (1 - mr)
        else:
            d = prev - x
            xk, xr = torch.addcmul(x, d, mk), torch.addcmul(x, d, mr)
        r = torch.sigmoid(self.receptance(xr))
        k = self.key(xk)
        k = torch.relu_(k).square_() if not k.requires_grad else torch.relu(k).square()
        return r * self.value(k), x[:, -1]


def group_norm(y: torch.Tensor, n_head: int, ln_x: nn.GroupNorm) -> torch.Tensor:
    """Per-head GroupNorm of the WKV output (eps 64e-5 = 1e-5 * 8^2, as the reference): [B, T, C] fp32.

    Normalising each head's N channels is a LayerNorm over the last axis of [B, T, H, N] (much
    cheaper than ``F.group_norm`` for decode-sized inputs), followed by the per-channel affine.
    """
    B, T, C = y.shape
    out = F.layer_norm(y.reshape(B, T, n_head, C // n_head), (C // n_head,), eps=ln_x.eps).view(B, T, C)
    return torch.addcmul(ln_x.bias.float(), out, ln_x.weight.float())


def make_ln_x(config: ModelConfig) -> nn.GroupNorm:
    return nn.GroupNorm(config.n_head, config.n_embd, eps=64e-5)


def heads_from_faaaa(sd: Mapping[str, torch.Tensor], n_embd: int) -> int:
    """The head size N from ``blocks.0.att.time_faaaa`` [H, N] (Eagle and Finch)."""
    faaaa = sd.get("blocks.0.att.time_faaaa")
    if faaaa is None or faaaa.dim() != 2:
        raise CheckpointError("missing or misshapen 'blocks.0.att.time_faaaa' (expected [n_head, head_size])")
    n_head, head_size = faaaa.shape
    if n_head * head_size != n_embd:
        raise CheckpointError(
            f"time_faaaa shape {tuple(faaaa.shape)} does not match n_embd {n_embd} (n_head * head_size)"
        )
    return head_size


def ln_x_init(config: ModelConfig, layer: int) -> dict[str, torch.Tensor]:
    """RWKV-LM's GroupNorm start: weight ((l+1)/L)^0.7, bias 0."""
    C = config.n_embd
    w = ((layer + 1) / config.n_layer) ** 0.7
    return {"att.ln_x.weight": torch.full((C,), w, dtype=torch.float64), "att.ln_x.bias": torch.zeros(C)}


def native_wkv_kernel(model: nn.Module, fused_epilogue: bool) -> tuple[str, str]:
    """``Version.wkv_kernel`` of the versions whose WKV runs on ``rwkvkit.ops.native`` (Eagle, Finch):
    the C recurrence on the CPU when built; Finch's fused path also hands it the decay before its
    exps and GroupNorm * silu(gate) as an epilogue."""
    from ..ops import native
    from .spec import CHUNKED

    if model.device.type != "cpu":
        return CHUNKED, f"native WKV: CPU-only (device {model.device})"
    if not native.available():
        return CHUNKED, "native WKV: the _wkv_cpu extension is not built"
    plain = "native C recurrence (_wkv_cpu), GroupNorm and gate after it"
    if not fused_epilogue:
        return plain, ""
    dt = compute_dtype(model.blocks[0].att.receptance)
    if not (model.kernels.fused and fused.available() and dt in fused.DTYPES):
        return plain, "the fused decay/GroupNorm/gate epilogue needs the fused kernels and an fp32/bf16 model"
    return "native C recurrence (_wkv_cpu) with the decay's exps, GroupNorm and gate fused", ""
