"""The five models the paper's MQAR figure compares, built by name at one size: ``build(kind, ...)``.

``rwkv4``, ``eagle`` and ``finch`` are ``rwkvkit.models.RWKV`` (versions 4, 5, 6) with RWKV-LM's
initialisation (``rwkvkit.train.init``); ``attention`` and ``mamba`` are the plain-PyTorch baselines of
``baselines.py``. ``LM`` wraps them behind one call, ``lm(tokens) -> logits [B, T, V] float32``, so the
experiments never branch on the model family.
"""

from __future__ import annotations

import torch
from torch import nn

from .baselines import Mamba, MambaConfig, Transformer, TransformerConfig

KINDS = ("rwkv4", "eagle", "finch", "attention", "mamba")
LABELS = {
    "rwkv4": "RWKV-4",
    "eagle": "Eagle (RWKV-5)",
    "finch": "Finch (RWKV-6)",
    "attention": "Attention",
    "mamba": "Mamba",
}
_VERSION = {"rwkv4": 4, "eagle": 5, "finch": 6}


class LM(nn.Module):
    """``lm(tokens [B, T]) -> logits [B, T, V]`` for any of ``KINDS``; ``lm.net`` is the model itself."""

    def __init__(self, kind: str, net: nn.Module, backend: str = "chunked") -> None:
        super().__init__()
        self.kind, self.net, self.backend = kind, net, backend

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kind in _VERSION:
            # training takes the chunked form; inference may take the fastest path ("auto")
            backend = self.backend if torch.is_grad_enabled() else "auto"
            return self.net(tokens, backend=backend)[0]
        return self.net(tokens)


def build(kind: str, n_layer: int, n_embd: int, vocab_size: int, *, head_size: int = 64, seed: int = 0) -> LM:
    """A freshly initialised model of ``kind`` (one of ``KINDS``); the seed fixes its weights."""
    if kind not in KINDS:
        raise ValueError(f"unknown model {kind!r}; choose from {KINDS}")
    torch.manual_seed(seed)
    if kind in _VERSION:
        from rwkvkit.config import ModelConfig
        from rwkvkit.models import RWKV
        from rwkvkit.train.init import init_weights

        v = _VERSION[kind]
        hs = n_embd if v == 4 else min(head_size, n_embd)
        cfg = ModelConfig(v, n_layer, n_embd, vocab_size, head_size=hs)
        return LM(kind, init_weights(RWKV(cfg), seed=seed))
    if kind == "attention":
        hs = min(head_size, n_embd)
        return LM(kind, Transformer(TransformerConfig(n_layer, n_embd, vocab_size, head_size=hs)))
    return LM(kind, Mamba(MambaConfig(n_layer, n_embd, vocab_size)))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
