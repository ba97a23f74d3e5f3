"""RWKV-7's fused time-mix for prompts (rwkvkit/ops/_wkv7_fused.c) against its PyTorch twin
(``wkv7_fused.timemix_ref``, the naive WKV-7), and the model's fused path against the unfused one."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit import kernels
from rwkvkit.ops import wkv7_fused
from rwkvkit.testing import random_checkpoint

pytestmark = pytest.mark.skipif(not wkv7_fused.available(), reason="_wkv7_fused not built")
bf16 = torch.bfloat16


def _case(B: int, T: int, H: int, N: int, first: bool, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C = H * N

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    mats = {name: rnd(B, T, C).to(dtype) for name in ("r", "k", "v", "za", "g")}
    mats["zw"] = rnd(B, T, C, scale=2.0).to(dtype)  # decays from ~0.55 to ~1 per step
    mats["zv"] = None if first else rnd(B, T, C).to(dtype)
    params = {n: rnd(C) for n in ("w0", "a0", "v0", "r_k", "lnx_b")}
    params |= {"k_k": torch.rand(C, generator=g) + 0.2, "k_a": torch.rand(C, generator=g) + 0.5}
    params["lnx_w"] = torch.rand(C, generator=g) + 0.5
    state = rnd(B, H, N, N, scale=0.3)
    v_first = None if first else rnd(B, T, C)
    return mats, params, state, v_first


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("B,T,H,N", [(1, 5, 2, 64), (2, 33, 3, 32), (1, 7, 1, 24)])  # N=64: AVX-512 step
def test_fused_timemix_matches_pytorch_twin(B, T, H, N, first):
    case = _case(B, T, H, N, first, torch.float32)
    out, s, vf = wkv7_fused.timemix(*case, torch.float32)
    want, s_want, vf_want = wkv7_fused.timemix_ref(*case, torch.float32)
    scale = want.abs().max()
    assert (out - want).abs().max() / scale < 2e-5
    assert (s - s_want).abs().max() < 2e-5
    assert torch.equal(vf, vf_want.float())
    assert not torch.equal(case[2], s)  # the state passed in is not modified


def test_fused_timemix_bf16_inputs_and_output(monkeypatch):
    """bf16 matrices' outputs are read as they are (widened exactly); the output rounded once to bf16."""
    case = _case(2, 20, 2, 64, False, bf16, seed=3)
    out, s, _ = wkv7_fused.timemix(*case, bf16)
    want, s_want, _ = wkv7_fused.timemix_ref(*case, torch.float32)
    assert out.dtype == bf16
    assert ((out.float() - want).abs() <= want.abs() * 2.0**-8 + 1e-4 * want.abs().max()).all()
    assert (s - s_want).abs().max() < 2e-5
    monkeypatch.setattr(kernels, "PORTABLE", True)  # the portable WKV step: the same numbers
    plain, s_plain, _ = wkv7_fused.timemix(*case, torch.float32)
    assert (plain - want).abs().max() / want.abs().max() < 2e-5
    assert (s_plain - s_want).abs().max() < 2e-5


@pytest.mark.parametrize("dtype", [torch.float32, bf16])
def test_model_prompt_fused_against_unfused(tmp_path, dtype):
    path = tmp_path / "g.pth"
    random_checkpoint(7, 3, 128, 500, head_size=64, dtype=dtype, seed=5, path=path)
    model = rwkvkit.load(path, dtype=dtype)
    tokens = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, st = model(tokens)
        model.set_kernels(fused=False)
        want, st_want = model(tokens)
    if dtype == torch.float32:
        assert (got - want).abs().max() <= 1e-5
        assert (st["wkv"] - st_want["wkv"]).abs().max() <= 1e-5
    else:  # the unfused modules round r, k, v, ... to bf16 between operations: close, not equal
        assert (got - want).abs().mean() <= 0.02 * want.std()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
