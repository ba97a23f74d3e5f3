"""Parity on the GPU: every version's random checkpoint in fp32 on CUDA (TF32 off) against the CPU's
whole-sequence logits, run whole, token by token, and with backends "chunked" and "naive"; final states
too. bf16 on CUDA against CPU fp32 is printed, not checked."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit.models.registry import VERSIONS
from rwkvkit.testing import random_checkpoint

LIMIT = 1e-4  # max |logit difference| fp32 device vs fp32 CPU


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


@pytest.mark.parametrize("version", list(VERSIONS))
def test_fp32_logits_and_state_match_the_cpu(sizes, report, tmp_path, version):
    dev, T = sizes.device, sizes.par_T
    path = tmp_path / f"v{version}.pth"
    random_checkpoint(
        version, sizes.par_layers, sizes.par_embd, sizes.par_vocab, head_size=sizes.par_head, path=path
    )
    tokens = torch.randint(0, sizes.par_vocab, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_state = rwkvkit.load(path)(tokens)
        model = rwkvkit.load(path, device=dev)
        x = tokens.to(dev)
        got = {}
        got["whole"], state = model(x)
        steps, st = [], None
        for t in range(T):
            logits, st = model(x[:, t : t + 1], st)
            steps.append(logits)
        got["step"] = torch.cat(steps, 1)
        got["chunked"] = model(x, backend="chunked")[0]
        got["naive"] = model(x, backend="naive")[0]
        bf16 = rwkvkit.load(path, device=dev, dtype=torch.bfloat16)(x)[0].float().cpu()
    diffs = {k: _max_abs(v, ref) for k, v in got.items()}
    state_rel = 0.0
    for s in (state, st):
        for key, r in ref_state.tensors.items():
            scale = 1.0 if key == "pp" else float(r.abs().max().clamp_min(1e-30))  # RWKV-4's max exponent
            state_rel = max(state_rel, _max_abs(s.tensors[key], r) / scale)
    err = (bf16 - ref).abs()
    top1 = float((bf16.argmax(-1) == ref.argmax(-1)).float().mean())
    report(
        f"parity v{version} fp32 {dev}: " + "  ".join(f"{k} {v:.1e}" for k, v in diffs.items())
        + f"  | state rel {state_rel:.1e}  | bf16 vs CPU fp32: max {err.max():.3f} mean {err.mean():.4f} "
        f"top-1 {top1:.1%}"
    )  # fmt: skip
    assert all(bool(torch.isfinite(v).all()) for v in got.values())
    assert max(diffs.values()) <= LIMIT, diffs
    assert state_rel <= LIMIT
