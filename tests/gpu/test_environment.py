"""What the GPU run ran on: torch, CUDA, the GPU, TF32 settings, which native extensions imported."""

from __future__ import annotations

import platform

import torch

from rwkvkit.ops import decode, fused, native
from rwkvkit.tokenizer import world


def test_environment_printout(sizes, report):
    report(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    if sizes.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        report(
            f"GPU: {p.name}  cc {p.major}.{p.minor}  {p.total_memory / 2**30:.0f} GiB  count {torch.cuda.device_count()}"
        )
        assert not torch.backends.cuda.matmul.allow_tf32  # parity is checked in true fp32
    exts = {
        "ops._wkv_cpu": native.available(),
        "ops._decode_cpu": decode.available(),
        "ops._fused_cpu": fused.available(),
        "tokenizer._native": world.native_available(),
    }
    report("rwkvkit native extensions: " + "  ".join(f"{k}={'yes' if v else 'no'}" for k, v in exts.items()))
