"""``RWKV.describe()``: which implementation each part of a loaded model runs for inference, and why a
faster one does not.

The parts: the WKV recurrence (the version says: ``Version.wkv_kernel``), the element-wise chains
between the matrices, the prompt's matrix products, the one-token step and the vocabulary head. Each
line names the implementation that runs for a no-gradient call with ``backend="auto"`` and the
model's ``Kernels`` choice, and, where a faster path exists but is not taken, the reason (the choice,
the build, the CPU, the dtype, the shapes). Training (gradients wanted) always runs the PyTorch
modules with the chunked WKV.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..dtypes import name_of
from ..ops import decode, fused, matmul
from . import engine
from .common import Linear, compute_dtype
from .quant import Int8Linear


class Part(NamedTuple):
    part: str
    kernel: str  # what runs
    why: str  # why not a faster path ('' when the fastest applies)


def parts(model: nn.Module) -> list[Part]:
    """The report as rows (see the module docstring)."""
    cpu = model.device.type == "cpu"
    wkv, wkv_why = model.config.spec.wkv_kernel(model)
    return [
        Part("WKV", wkv, wkv_why),
        Part("element-wise chains", *_chains(model, cpu)),
        Part("prompt matmuls", *_prompt_matmuls(model, cpu)),
        Part("one-token step", *_step(model, cpu)),
        Part("head", *_head(model, cpu)),
    ]


def describe(model: nn.Module) -> str:
    cfg, spec = model.config, model.config.spec
    lines = [
        f"{spec.name}: L{cfg.n_layer} C{cfg.n_embd} H{cfg.n_head}x{cfg.head_size} F{cfg.ffn_dim} "
        f"V{cfg.vocab_size}" + "".join(f" {k}={v}" for k, v in cfg.sizes.items()),
        f"dtype {name_of(model.dtype)} ("
        + ("embedding and LoRAs; matrices int8" if _quantisation(model) != "none" else "matrices")
        + "; norms, decays and the state fp32), "
        f"quantisation {_quantisation(model)}, device {model.device}"
        + (", fp16 layer rescaling" if getattr(model, "rescale_every", 0) else "")
        + (", ln0 folded" if getattr(model, "ln0_folded", False) else ", trainable (ln0 kept)"),
        "kernel choice: " + ", ".join(f"{k}={v}" for k, v in vars(model.kernels).items()),
    ]
    width = max(len(p.part) for p in parts(model))
    for p in parts(model):
        lines.append(f"  {p.part:<{width}}  {p.kernel}" + (f"  [not faster: {p.why}]" if p.why else ""))
    return "\n".join(lines)


def _quantisation(model: nn.Module) -> str:
    return "int8 (Q8_0)" if any(isinstance(m, Int8Linear) for m in model.modules()) else "none"


def _block_dtype(model: nn.Module) -> torch.dtype:
    return compute_dtype(model.blocks[0].ffn.key)


def _chains(model: nn.Module, cpu: bool) -> tuple[str, str]:
    torch_ops = "PyTorch ops"
    if not cpu:
        return torch_ops, f"the fused kernels are CPU-only (device {model.device})"
    if not fused.available():
        return torch_ops, "the fused C extension is not built"
    if not model.kernels.fused:
        return torch_ops, "switched off (kernels.fused=False)"
    dt = _block_dtype(model)
    if dt not in fused.DTYPES:
        return (
            torch_ops,
            f"{name_of(dt)} models use the PyTorch path (the kernels read and write fp32 and bf16)",
        )
    lora = " and Finch-style LoRAs on AMX tiles" if fused.lora_available() else ""
    return f"fused C kernels (_fused_cpu){lora}", ""


def _prompt_matmuls(model: nn.Module, cpu: bool) -> tuple[str, str]:
    kernel, why = _long_prompt_matmuls(model, cpu)
    int8 = _quantisation(model) != "none"
    if cpu and decode.available() and (int8 or _block_dtype(model) == torch.bfloat16):
        few = "32 rows: the int8 kernels of the native step" if int8 else "16 rows: the native step's kernels"
        return f"up to {few}; more rows: {kernel}", why
    if cpu and not int8 and _block_dtype(model) == torch.float16:  # common.Linear, common.lora_mm
        few = "up to 16 rows: the native step's fp16 kernels; " if decode.available() else ""
        return f"{few}more rows and the LoRAs: fp32 products of the widened fp16 weights (F.linear)", why
    return kernel, why


def _long_prompt_matmuls(model: nn.Module, cpu: bool) -> tuple[str, str]:
    int8 = _quantisation(model) != "none"
    dt = torch.bfloat16 if int8 else _block_dtype(model)
    prefix = "int8 matrices dequantised to bf16 per call, then " if int8 else ""
    onednn = f"{prefix}F.linear (oneDNN)"
    if not cpu:
        return f"{prefix}F.linear", ""
    if dt != torch.bfloat16:
        return onednn, f"AMX matmul: it takes bf16, this model is {name_of(dt)}"
    if not model.kernels.amx_matmul:
        return onednn, "AMX matmul: switched off (kernels.amx_matmul=False)"
    if not matmul.available():
        return onednn, f"AMX matmul: {matmul.unavailable_reason()}"
    shapes = [m.weight.shape for m in model.blocks.modules() if isinstance(m, Linear)]
    odd = [tuple(s) for s in shapes if s[0] % 32 or s[1] % 32]
    if odd:
        return (
            f"{prefix}AMX matmul for most, F.linear for {len(odd)}",
            f"AMX matmul: shapes {odd[:2]} not multiples of 32",
        )
    return f"{prefix}AMX bf16 matmul (_matmul_cpu), relu^2 and gated residual as epilogues", ""


def _step(model: nn.Module, cpu: bool) -> tuple[str, str]:
    modules = "the PyTorch modules (one token)"
    if not cpu:
        return modules, f"native step: CPU-only (device {model.device})"
    if not model.kernels.native_step:
        return modules, "native step: switched off (kernels.native_step=False)"
    try:
        model.config.spec.native_step(model)
    except engine.Unsupported as e:
        return modules, f"native step: {e}"
    kernel = model.config.spec.native_step_kernel() + _one_row(model)
    if _quantisation(model) == "none" and _block_dtype(model) != torch.bfloat16:
        return kernel, ""  # fp32 matrices: float32 activations for any number of rows
    if not model.kernels.batch_bf16:
        return kernel, "several rows keep float32 activations (kernels.batch_bf16=False)"
    dp = "VDPBF16PS" if decode.bf16dp() else "fp32 FMAs on bf16 values (no AVX512_BF16)"
    return f"{kernel}; several rows: bf16 activations ({dp})", ""


def _one_row(model: nn.Module) -> str:
    """One row's matrix kernel for the model's weights (``_decode_rows1.c``), as the CPU allows."""
    ext = decode._decode_cpu
    if ext is None or not ext.avx512:
        return ""
    if _quantisation(model) != "none":
        how = (
            "VPDPBUSD on x as two 8-bit digits of 16 bits"
            if ext.dot_vnni
            else "widened to fp32 (no AVX512_VNNI)"
        )
        return f"; one row of int8: {how}"
    dt = _block_dtype(model)
    if dt == torch.bfloat16:
        how = "VDPBF16PS on x as two bf16 parts" if ext.dot_bf16 else "widened to fp32 (no AVX512_BF16)"
        return f"; one row of bf16: {how}"
    if dt == torch.float16:
        return "; one row of fp16: VCVTPH2PS and fp32 FMAs"
    return ""


def _head(model: nn.Module, cpu: bool) -> tuple[str, str]:
    head = model.head
    step = _step(model, cpu)[1] == ""
    where = "in the native step for one token; prompts: " if step else ""
    if isinstance(head, Int8Linear):
        kernel = "the int8 matrix-vector kernel" if decode.available() and cpu else "dequantise + F.linear"
        return f"{where}{kernel} (last positions), bf16 matmul beyond 32 rows", ""
    dt = head.weight.dtype
    if cpu and dt in (torch.bfloat16, torch.float16) and decode.available():
        return f"{where}the step's kernels for up to 16 rows, else as the prompt matmuls", ""
    if cpu and dt == torch.float16:
        return f"{where}as the prompt matmuls", ""
    return f"{where}F.linear ({name_of(dt)})", ""
