"""LoRA fine-tuning of the large matrices, and merging the adapters back for export.

``add_lora(model, r, alpha, targets)`` replaces each targeted ``nn.Linear`` (names such as
``att.key`` or ``ffn.value``, matched against the end of the module path) with a ``LoRALinear``
that keeps the frozen ``weight`` under the same name (so checkpoint keys are unchanged) and adds
``lora_A`` [r, in] (Kaiming-uniform) and ``lora_B`` [out, r] (zero, so training starts from the base
model). Everything else in the model is frozen. ``merge_lora(model)`` folds
``weight += (alpha/r) * B @ A`` and puts plain linears back, giving a model whose ``state_dict()``
is an official checkpoint again. ``lora_state_dict`` returns only the adapters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A frozen linear layer (rwkvkit's semantics: input cast to the weight dtype, fp32 output) plus LoRA."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {r}")
        self.base_cls = type(base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.register_buffer("lora_scale", torch.tensor(alpha / r))  # so a state dict can be merged alone
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out] fp32
        w = self.weight
        xb = x if (x.dtype == w.dtype or torch.is_autocast_enabled(x.device.type)) else x.to(w.dtype)
        out = F.linear(xb, w).float()
        xa = self.dropout(x.float())
        return out + F.linear(F.linear(xa, self.lora_A.float()), self.lora_B.float()) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain linear layer of the original class with the adapter folded into its weight."""
        lin = self.base_cls(self.in_features, self.out_features)
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        lin.weight = nn.Parameter((self.weight.float() + delta).to(self.weight.dtype), requires_grad=False)
        return lin.to(self.weight.device)


def _targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(n.endswith(t) for t in targets)
    ]
    if not names:
        raise ValueError(f"LoRA: no nn.Linear matches the targets {list(targets)}")
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ("att.key",),
    dropout: float = 0.0,
) -> list[str]:
    """Freeze ``model`` and wrap the targeted linears with LoRA in place; returns the wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = _targets(model, targets)
    for name in names:
        _set(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (in place) and return the model with plain linears."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _set(model, name, m.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``...lora_A``, ``...lora_B``, ``...lora_scale``)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if ".lora_" in k}
