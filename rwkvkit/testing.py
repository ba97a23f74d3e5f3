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

from .config import ModelConfig


def checkpoint_keys(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official checkpoint for ``config``, with its shape (the order of RWKV-LM's files)."""
    C, V, L, F = config.n_embd, config.vocab_size, config.n_layer, config.ffn_dim
    H, N = config.n_head, config.head_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(L):
        b = f"blocks.{i}."
        if i == 0:
            shapes[b + "ln0.weight"] = (C,)
            shapes[b + "ln0.bias"] = (C,)
        for ln in ("ln1", "ln2"):
            shapes[f"{b}{ln}.weight"] = (C,)
            shapes[f"{b}{ln}.bias"] = (C,)
        a = b + "att."
        if config.version == 4:
            for m in "kvr":
                shapes[a + f"time_mix_{m}"] = (1, 1, C)
            shapes[a + "time_decay"] = (C,)
            shapes[a + "time_first"] = (C,)
        elif config.version == 5:
            for m in "kvrg":
                shapes[a + f"time_mix_{m}"] = (1, 1, C)
            shapes[a + "time_decay"] = (H, N)
            shapes[a + "time_faaaa"] = (H, N)
        else:
            D, Dw = config.mix_lora, config.decay_lora
            for m in "xwkvrg":
                shapes[a + f"time_maa_{m}"] = (1, 1, C)
            shapes[a + "time_maa_w1"] = (C, 5 * D)
            shapes[a + "time_maa_w2"] = (5, D, C)
            shapes[a + "time_decay"] = (1, 1, C)
            shapes[a + "time_decay_w1"] = (C, Dw)
            shapes[a + "time_decay_w2"] = (Dw, C)
            shapes[a + "time_faaaa"] = (H, N)
        for m in ("receptance", "key", "value"):
            shapes[a + f"{m}.weight"] = (C, C)
        shapes[a + "output.weight"] = (C, C)
        if config.version >= 5:
            shapes[a + "gate.weight"] = (C, C)
            shapes[a + "ln_x.weight"] = (C,)
            shapes[a + "ln_x.bias"] = (C,)
        f = b + "ffn."
        mix = "time_maa" if config.version == 6 else "time_mix"
        shapes[f + f"{mix}_k"] = (1, 1, C)
        shapes[f + f"{mix}_r"] = (1, 1, C)
        shapes[f + "key.weight"] = (F, C)
        shapes[f + "receptance.weight"] = (C, C)
        shapes[f + "value.weight"] = (C, F)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


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
