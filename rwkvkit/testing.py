"""Random-weight checkpoints in the official layout, for tests, benchmarks and examples.

No model hub is reachable in CI, so every parity test builds its own checkpoint here: the same keys,
shapes and dtypes as BlinkDL's released ``.pth`` files, with weights drawn so that the model's
activations look like a real one's (unit-scale matrices; the version's own parameters, such as decays
spread over the realistic range and LoRAs large enough to make Finch genuinely data-dependent, drawn
as the version declares: ``Version.random_param``).
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
    ffn_dim: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    time_state: bool = False,
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    **sizes: int,
) -> dict[str, torch.Tensor]:
    """A random state dict in the official layout; written with ``torch.save`` to ``path`` if given.
    ``sizes``: the version's own sizes (Finch: ``mix_lora``, ``decay_lora``), else its defaults.
    ``device``: where the tensors are drawn (another device's generator gives other values)."""
    cfg = ModelConfig(version, n_layer, n_embd, vocab_size, head_size=head_size, ffn_dim=ffn_dim, **sizes)
    spec = cfg.spec
    g = torch.Generator(device=device).manual_seed(seed)

    def U(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=g, device=device) * (hi - lo) + lo

    sd: dict[str, torch.Tensor] = {}
    for key, shape in checkpoint_keys(cfg).items():
        name = key.split(".")[-1] if not key.endswith((".weight", ".bias")) else key.split(".")[-2]
        own = None if key.endswith((".weight", ".bias")) else spec.random_param(name, shape, U)
        if own is not None:
            t = own
        elif key == "emb.weight":
            t = torch.randn(shape, generator=g, device=device)
        elif key.endswith(".bias"):
            t = U(shape, -0.2, 0.2)
        elif key.endswith("weight") and (".ln" in key or key.startswith("ln_out")):
            t = U(shape, 0.5, 1.5)
        elif key.endswith(".weight"):  # linear [out, in]
            t = torch.randn(shape, generator=g, device=device) / shape[1] ** 0.5
            if key == "head.weight":
                t = t * 2
        else:
            raise AssertionError(f"{spec.name} declares no random value for {key}")
        sd[key] = t.to(dtype)
    if time_state:
        if spec.time_state is None:
            raise ValueError(f"time_state does not exist for {spec.name} checkpoints")
        slot = next(s for s in spec.recurrent if s.name == spec.time_state.slot)
        for i in range(n_layer):
            sd[f"blocks.{i}.att.time_state"] = (
                torch.randn(slot.shape(cfg), generator=g, device=device) * 0.3
            ).to(dtype)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(sd, path)
    return sd
