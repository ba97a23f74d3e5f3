"""The GPU check, as pytest modules: parity on CUDA, the WKV ops, training (single, DDP and FSDP over
NCCL under torchrun) and a speed printout. Every test skips without CUDA.

One command on a GPU machine, from the repository root (figures printed; with ``OUT`` set they are
also appended to ``$OUT/gpu_report.txt``):

    python -m pytest tests/gpu -s -q

``--gpu-device cpu`` runs the same checks at tiny sizes on the CPU (gloo instead of NCCL), to check
the modules themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch


@dataclass(frozen=True)
class Sizes:
    """Every size the checks use: the GPU run's, or tiny ones on the CPU."""

    device: str
    par_layers: int = 3
    par_embd: int = 256
    par_vocab: int = 1000
    par_head: int = 64
    par_T: int = 100
    ops_shape: tuple[int, int, int, int] = (2, 300, 4, 64)  # B, T, H, N
    tr_embd: int = 128
    tr_head: int = 64
    tr_ctx: int = 128
    tr_bsz: int = 8
    tr_steps: int = 60
    tr_dist_steps: int = 10
    tr_tokens: int = 40000
    tr_timeout: float = 180.0
    speed_shapes: list[tuple[str, int, int, int, int]] = field(
        default_factory=lambda: [("0.1B", 12, 768, 65536, 8), ("1.5B", 24, 2048, 65536, 4)]
    )  # (name, layers, embd, vocab, train batch)
    sp_prompt: int = 2048
    sp_decode: int = 64
    sp_batch: int = 64
    sp_train_T: int = 1024


TINY = dict(
    par_layers=2, par_embd=64, par_vocab=256, par_head=32, par_T=24, ops_shape=(1, 40, 2, 16), tr_embd=64,
    tr_head=32, tr_ctx=32, tr_bsz=4, tr_steps=8, tr_dist_steps=3, tr_tokens=6000,
    speed_shapes=[("tiny", 2, 128, 1000, 2)], sp_prompt=64, sp_decode=8, sp_batch=4, sp_train_T=64,
)  # fmt: skip


@pytest.fixture(scope="session")
def sizes(request: pytest.FixtureRequest) -> Sizes:
    device = request.config.getoption("--gpu-device")
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("CUDA is not available (tests/gpu run on a GPU machine)")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return Sizes(device="cuda")
    return Sizes(device="cpu", **TINY)


@pytest.fixture(scope="session")
def report():
    """``report(line)``: print a figure (shown with -s) and append it to $OUT/gpu_report.txt if OUT is set."""
    out = os.environ.get("OUT")
    path = Path(out) / "gpu_report.txt" if out else None

    def line(text: str = "") -> None:
        print(text, flush=True)
        if path is not None:
            with path.open("a") as f:
                f.write(text + "\n")

    return line
