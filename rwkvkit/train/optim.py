"""RWKV-LM's optimiser recipe: parameter groups, learning-rate schedule and the L2Wrap regulariser.

- Groups: weight decay only on 2-D ``*.weight`` matrices (which includes ``emb`` and ``head``, as
  RWKV-LM; never ``time_*``, LayerNorms, LoRA parameters such as Finch's ``time_*_w1/w2`` or
  fine-tuning adapters); the learning-rate multipliers each version declares (``Version.lr_mult``,
  merged in ``rwkvkit.models.registry``: the decays at 2x, the bonuses at 3x). Each group carries an
  ``lr_mult`` applied by ``set_lr``.
- Schedule: warmup from 1% to ``lr_init`` over ``warmup_steps``, then cosine or exponential decay to
  ``lr_final`` at ``max_steps`` (RWKV-LM's exponential is ``lr_init * (lr_final/lr_init)^progress``).
  A pure function of the step, so resuming needs only the step.
- L2Wrap: the loss passes through unchanged; in backward the largest logit of every position gets
  an extra gradient ``coef / (B*T) * max_logit`` (scaled by the incoming gradient, so it follows
  gradient accumulation and chunking), which keeps logits from drifting up in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..models.registry import lr_multiplier
from .config import TrainConfig


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Trainable parameters split into RWKV-LM's groups (empty groups dropped): "decay" (weight decay),
    "plain", and "x<m>" per learning-rate multiplier m != 1 (no weight decay)."""
    buckets: dict[str, list[nn.Parameter]] = {"decay": [], "plain": []}
    mults: dict[str, float] = {"decay": 1.0, "plain": 1.0}
    for name, p in named:
        if not p.requires_grad:
            continue
        mult = lr_multiplier(name)
        if mult != 1.0:
            key = f"x{mult:g}"
            buckets.setdefault(key, []).append(p)
            mults[key] = mult
        elif p.dim() >= 2 and name.endswith(".weight") and "lora_" not in name and weight_decay > 0:
            buckets["decay"].append(p)
        else:
            buckets["plain"].append(p)
    return [
        {"params": ps, "lr_mult": mults[k], "weight_decay": weight_decay if k == "decay" else 0.0, "name": k}
        for k, ps in buckets.items()
        if ps
    ]


def make_optimizer(named: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(named, cfg.weight_decay)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    # fused AdamW for plain CUDA tensors (FSDP2's DTensors take the default implementation)
    fused = all(p.is_cuda and type(p.data) is torch.Tensor for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, lr=cfg.lr_init, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=fused or None
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr_init * (0.01 + 0.99 * step / cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return cfg.lr_init
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(max((step - cfg.warmup_steps) / span, 0.0), 1.0)
    if cfg.lr_schedule == "exp":
        return cfg.lr_init * math.exp(math.log(cfg.lr_final / cfg.lr_init) * progress)
    return cfg.lr_final + 0.5 * (cfg.lr_init - cfg.lr_final) * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


class L2Wrap(torch.autograd.Function):
    """``L2Wrap.apply(loss, logits, coef)``: returns ``loss``; adds RWKV-LM's max-logit penalty in backward."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, logits: torch.Tensor, coef: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        ctx.coef = coef
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        factor = ctx.coef / (logits.shape[0] * logits.shape[1])
        maxx, ids = torch.max(logits, -1, keepdim=True)
        gy = torch.zeros_like(logits)
        gy.scatter_(-1, ids, maxx * factor * grad_output)
        return grad_output, gy, None
