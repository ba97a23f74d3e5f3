"""Speed on the GPU (printed, not held to a target): random Finch at the 0.1B and 1.5B shapes in bf16,
prefill, batch-1 and batch-64 decode, forward + backward training tokens/s, and peak memory."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from rwkvkit.config import ModelConfig, checkpoint_keys
from rwkvkit.models import RWKV
from rwkvkit.testing import random_checkpoint


def random_finch(layers: int, embd: int, vocab: int, device: str, dtype: torch.dtype) -> RWKV:
    """A random Finch drawn on ``device`` (as ``random_checkpoint`` draws, without a trip through the CPU)."""
    sd = random_checkpoint(6, layers, embd, vocab, head_size=64, device=device)
    cfg = ModelConfig(6, layers, embd, vocab, head_size=64)
    keys = checkpoint_keys(cfg)
    sd = {k: (v.to(dtype) if cfg.spec.is_matrix(k) else v).reshape(keys[k]) for k, v in sd.items()}
    with torch.device("meta"):
        model = RWKV(cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    return model


def best_seconds(fn: Callable[[], None], device: str, reps: int) -> float:
    """Best of ``reps`` runs after one warm-up, with the peak memory counter reset first."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fn()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def peak(device: str) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else "n/a"


@pytest.mark.parametrize("shape", [0, 1])
def test_speed_printout(sizes, report, shape):
    if shape >= len(sizes.speed_shapes):
        pytest.skip("one shape at the CPU sizes")
    name, L, D, V, train_b = sizes.speed_shapes[shape]
    dev = sizes.device
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model = random_finch(L, D, V, dev, torch.bfloat16).eval().requires_grad_(False)
    report(f"speed {name}: Finch L{L} C{D} V{V} bf16 on {dev}")
    prompt = torch.randint(0, V, (1, sizes.sp_prompt), generator=gen).to(dev)

    def prefill() -> None:
        with torch.inference_mode():
            model(prompt, last_only=True)

    sec = best_seconds(prefill, dev, 3)
    report(f"  prefill T={sizes.sp_prompt}: {sizes.sp_prompt / sec:,.0f} tok/s  peak {peak(dev)}")
    for batch in (1, sizes.sp_batch):
        tok0 = torch.randint(0, V, (batch, 1), generator=gen).to(dev)

        def decode(tok0: torch.Tensor = tok0) -> None:
            with torch.inference_mode():
                st, tok = model.init_state(tok0.shape[0]), tok0
                for _ in range(sizes.sp_decode):
                    logits, st = model(tok, st)
                    tok = logits[:, -1].argmax(-1, keepdim=True)

        sec = best_seconds(decode, dev, 2)
        report(
            f"  decode batch {batch} ({sizes.sp_decode} steps): {batch * sizes.sp_decode / sec:,.0f} tok/s "
            f"({sec / sizes.sp_decode * 1e3:.1f} ms/step)  peak {peak(dev)}"
        )
    del model
    model = random_finch(L, D, V, dev, torch.float32).train().requires_grad_(True)
    data = torch.randint(0, V, (train_b, sizes.sp_train_T + 1), generator=gen).to(dev)

    def train_step() -> None:  # bf16 autocast, chunked WKV, no optimiser step
        with torch.autocast(data.device.type, dtype=torch.bfloat16):
            logits, _ = model(data[:, :-1], backend="chunked")
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)

    sec = best_seconds(train_step, dev, 2)
    report(
        f"  train fwd+bwd B={train_b} T={sizes.sp_train_T}: {train_b * sizes.sp_train_T / sec:,.0f} tok/s  "
        f"peak {peak(dev)}"
    )
