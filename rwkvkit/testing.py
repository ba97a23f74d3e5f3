"""Random-weight checkpoints in the official layout, for tests, benchmarks and examples.

No model hub is reachable in CI, so every parity test builds its own checkpoint here: the same keys,
shapes and dtypes as BlinkDL's released ``.pth`` files, with weights drawn so that the model's
activations look like a real one's (unit-scale matrices, decays spread over the realistic range,
Finch LoRAs large enough to make the decay and token shift genuinely data-dependent).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ModelConfig, checkpoint_keys


def random_checkpoint(
    version: int,
    n_layer: int = 2,
    n_embd: int = 64,
    vocab_size: int = 256,
    *,
    head_size: int = 32,
    mix_lora: int = 32,
    decay_lora: int = 64,
    ffn_dim: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    time_state: bool = False,
    path: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """A random state dict in the official layout; written with ``torch.save`` to ``path`` if given."""
    cfg = ModelConfig(
        version,
        n_layer,
        n_embd,
        vocab_size,
        head_size=n_embd if version == 4 else head_size,
        ffn_dim=ffn_dim,
        mix_lora=mix_lora,
        decay_lora=decay_lora,
    )
    g = torch.Generator().manual_seed(seed)

    def U(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    sd: dict[str, torch.Tensor] = {}
    for key, shape in checkpoint_keys(cfg).items():
        name = key.split(".")[-1] if not key.endswith((".weight", ".bias")) else key.split(".")[-2]
        if key == "emb.weight":
            t = torch.randn(shape, generator=g)
        elif key.endswith(".bias"):
            t = U(shape, -0.2, 0.2)
        elif key.endswith("weight") and (".ln" in key or key.startswith("ln_out")):
            t = U(shape, 0.5, 1.5)
        elif name.startswith(("time_mix", "time_maa")) and name not in ("time_maa_w1", "time_maa_w2"):
            t = U(shape, 0.0, 1.0)
        elif name == "time_maa_w1":
            t = U(shape, -0.5, 0.5) / shape[0] ** 0.5 * 4
        elif name == "time_maa_w2":
            t = U(shape, -0.5, 0.5) / shape[1] ** 0.5
        elif name == "time_decay_w1":
            t = U(shape, -0.5, 0.5) / shape[0] ** 0.5 * 4
        elif name == "time_decay_w2":
            t = U(shape, -1.0, 1.0) / shape[0] ** 0.5 * 2
        elif name == "time_decay":
            # log(-log w): -6 (slow decay) .. 1.5 (w = exp(-4.5)); Finch's LoRA adds data-dependent swings.
            t = U(shape, -6.0, 1.5 if version != 4 else 1.0)
        elif name in ("time_first", "time_faaaa"):
            t = U(shape, -1.0, 1.0)
        elif key.endswith(".weight"):  # linear [out, in]
            t = torch.randn(shape, generator=g) / shape[1] ** 0.5
            if key == "head.weight":
                t = t * 2
        else:  # pragma: no cover - every key is covered above
            raise AssertionError(key)
        sd[key] = t.to(dtype)
    if time_state:
        if version == 4:
            raise ValueError("time_state exists only for RWKV-5/6 checkpoints")
        H, N = cfg.n_head, cfg.head_size
        for i in range(n_layer):
            sd[f"blocks.{i}.att.time_state"] = (torch.randn((H, N, N), generator=g) * 0.3).to(dtype)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, path)
    return sd
