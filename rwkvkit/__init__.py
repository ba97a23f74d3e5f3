"""rwkvkit: Eagle (RWKV-5) and Finch (RWKV-6) language models, with RWKV-4 as baseline.

Public entry points (imported lazily, so ``import rwkvkit`` costs nothing until used):

- ``rwkvkit.load(path, device="cpu", dtype=torch.float32, quantize=None)`` -> model
- ``rwkvkit.Tokenizer(path=None)`` -> the RWKV World tokenizer
- ``rwkvkit.generate(model, tokenizer, prompt, ...)`` -> streamed text
- ``rwkvkit.ModelConfig``, ``rwkvkit.State``
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "rwkvkit.checkpoint",
    "save": "rwkvkit.checkpoint",
    "RWKV": "rwkvkit.models",
    "ModelConfig": "rwkvkit.config",
    "CheckpointError": "rwkvkit.config",
    "State": "rwkvkit.state",
    "Tokenizer": "rwkvkit.tokenizer",
    "generate": "rwkvkit.generation",
    "SamplingParams": "rwkvkit.sampling",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'rwkvkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value  # found once: later lookups do not come here
    return value
