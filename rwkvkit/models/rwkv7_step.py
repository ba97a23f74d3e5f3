"""Goose's (RWKV-7) one-call native decode step: its plan and its step object.

The counterpart of ``engine.NativeStep`` (Eagle and Finch, ``_decode_cpu.c``) for RWKV-7, whose layer
has other parts (six static mixes, four LoRAs, the in-context rate, the value residual, no
receptance in the channel-mix): ``rwkvkit/ops/_decode_v7.c`` runs every layer and the head in one C
call (a step of several rows of a bf16 or int8 model with bf16 activations, as Finch's), and this module writes its plan (``plan7_t`` / ``layer7_t``: a flat int64 array of sizes and
addresses, with ``engine.PlanBuilder``'s records) and checks, at every call, that the model still
holds the tensors the plan points to. ``RWKV7.native_step`` (``rwkv7.py``) builds it; the model
caches it as it caches Finch's, and runs it for T == 1 CPU inference calls when ``Kernels.native_step``
is on.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..ops import decode, decode_v7
from ..state import State
from .engine import PlanBuilder, PlannedStep, Unsupported


def kernel() -> str:
    """What the step runs, for ``model.describe()``."""
    isa = "AVX-512" if decode_v7.avx512() and not kernels.PORTABLE else "plain C (no AVX-512)"
    return f"native one-call C step (_decode_v7, {isa}): every layer and the head"


def _layer(b: PlanBuilder, block: nn.Module, C: int) -> None:
    """``layer7_t``: the vectors, the LoRAs (input-major) and the matrices of one block."""
    att, ffn = b.own(block, "att"), b.own(block, "ffn")
    for ln in ("ln1", "ln2"):
        b.vec(b.own(block, ln), "weight", C)
        b.vec(getattr(block, ln), "bias", C)
    for m in "rwkvag":
        b.vec(att, f"x_{m}", C)
    for name in ("w0", "a0", "v0", "k_k", "k_a", "r_k"):
        b.vec(att, name, C)
    b.vec(b.own(att, "ln_x"), "weight", C)
    b.vec(att.ln_x, "bias", C)
    b.vec(ffn, "x_k", C)
    for name in ("w", "a", "v", "g"):
        first, second = b.own(att, f"{name}1"), b.own(att, f"{name}2")
        if name == "v" and att.first:  # layer 0: the value residual's LoRA is not used
            b.lora(None, "", 0, 0)
            b.lora(None, "", 0, 0)
            continue
        b.lora(att, f"{name}1", first.shape[1], C)
        b.lora(att, f"{name}2", C, second.shape[0])
    for name in ("receptance", "key", "value", "output"):
        b.matrix(att, name)
    for name in ("key", "value"):
        b.matrix(ffn, name)


class NativeStep7(PlannedStep):
    """A plan for one RWKV-7 model; ``step(x, state)`` runs one token for every row."""

    def __init__(self, model: nn.Module) -> None:
        if not decode_v7.available():
            raise Unsupported("the _decode_v7 extension is not built")
        cfg = model.config
        C = cfg.n_embd
        header, per_layer = decode_v7.layout()
        b = PlanBuilder()
        b.ints += [cfg.version, cfg.n_layer, C, cfg.n_head, cfg.head_size, cfg.ffn_dim, cfg.vocab_size]
        b.ints += [cfg.decay_lora, cfg.a_lora, cfg.v_lora, cfg.gate_lora]
        b.ints.append(getattr(model, "rescale_every", 0))  # fp16: x halved after every n-th block
        b.vec(b.own(model, "ln_out"), "weight", C)
        b.vec(model.ln_out, "bias", C)
        b.matrix(model, "head")
        if len(b.ints) != header:
            raise AssertionError("plan7 header layout")
        blocks = b.own(model, "blocks")
        for i in range(cfg.n_layer):
            start = len(b.ints)
            _layer(b, b.own(blocks, str(i)), C)
            if len(b.ints) - start != per_layer:
                raise AssertionError("plan7 layer layout")
        self._keep(cfg, b)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """x [B, C] embeddings (consumed) -> (logits [B, V] fp32, new state); ``state`` is not modified."""
        return self._run(
            decode_v7.step, x, state, "wkv", portable=int(kernels.PORTABLE), bf16dp=int(decode.bf16dp())
        )
