"""The AMX bf16 matmul (rwkvkit.ops.matmul) against F.linear, and the models with it on and off.

Tolerances. The kernel multiplies the same bf16 values exactly and sums the products in fp32, as
oneDNN does, only in another order; the result is then rounded to bf16. Against the fp32 product of
the same bf16 values (F.linear in fp32) the error is the output rounding, half a bf16 ulp (2^-9 of
the value), plus the fp32 summation error, about K * 2^-24 of the row's sum of |products| (bounded
here, relative to the row's largest |y|, by 2^-12). Hence |y - ref| <= 2^-8 |ref| + 2^-12 * rowmax.
The relu2 epilogue rounds y, squares in fp32 and rounds again, the steps of
``fused.relu_square_(F.linear(x, w))``: on the kernel's own y it is exact; against F.linear's y it
may differ where the two products round y differently (one bf16 ulp of y, about two of y^2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rwkvkit
from rwkvkit import kernels
from rwkvkit.models import common
from rwkvkit.ops import fused, matmul
from rwkvkit.testing import random_checkpoint

pytestmark = pytest.mark.skipif(not matmul.available(), reason="AMX matmul not built or no AMX-BF16")
bf16 = torch.bfloat16


def _pair(M: int, N: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g).to(bf16), torch.randn(N, K, generator=g).to(bf16)


def assert_matches_fp32(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = F.linear(x.float(), w.float())
    assert y.dtype == bf16 and y.shape == ref.shape
    rowmax = ref.abs().amax(-1, keepdim=True)
    bound = ref.abs() * 2.0**-8 + rowmax * 2.0**-12
    assert ((y.float() - ref).abs() <= bound).all(), (y.float() - ref).abs().max()


@pytest.mark.parametrize("M", [1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 100, 511, 512, 513])
def test_linear_matches_fp32_product(M):
    x, w = _pair(M, 96, 128, seed=M)
    assert_matches_fp32(matmul.linear(x, w), x, w)


@pytest.mark.parametrize("N,K", [(32, 32), (64, 768), (768, 768), (2688, 768), (768, 2688), (160, 96)])
def test_linear_shapes(N, K):
    x, w = _pair(77, N, K, seed=N + K)
    assert_matches_fp32(matmul.linear(x, w), x, w)


def test_linear_keeps_leading_dims_and_reads_strided_inputs():
    x, w = _pair(2 * 40, 64, 96)
    x3 = x.view(2, 40, 96)
    y = matmul.linear(x3, w)
    assert y.shape == (2, 40, 64) and torch.equal(y.view(80, 64), matmul.linear(x, w))
    xt = x.t().contiguous().t()  # same values, column-major
    wt = torch.cat([w, w], dim=1)[:, :96]  # rows with a stride
    assert torch.equal(matmul.linear(xt, wt), matmul.linear(x, w))


@pytest.mark.parametrize("M", [1, 33, 512])
def test_relu2_epilogue(M):
    x, w = _pair(M, 256, 192, seed=7)
    got = matmul.linear(x, w, "relu2")
    assert torch.equal(got, fused.relu_square_(matmul.linear(x, w)))  # the same steps on the same y
    want = fused.relu_square_(F.linear(x, w))
    ulp = torch.maximum(got.float().abs(), want.float().abs()) * 2.0**-7
    assert ((got.float() - want.float()).abs() <= 2 * ulp).all()  # y rounded differently: ~2 ulps of y^2
    assert (got.float() >= 0).all()


@pytest.mark.parametrize("M", [1, 31, 33, 512])
def test_gated_residual_epilogue_equals_the_composition(M):
    # the same roundings as the channel-mix's separate passes on our own product: bit-equal
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 256, generator=g).to(torch.bfloat16)
    w = (torch.randn(96, 256, generator=g) * 0.1).to(torch.bfloat16)
    r = (torch.randn(M, 96, generator=g) * 3).to(torch.bfloat16)
    res = torch.randn(M, 96, generator=g)
    want = res + fused.sigmoid_mul(r, matmul.linear(x, w), torch.float32)
    got = matmul.gated_residual_(res, x, w, r)
    assert got is res and torch.equal(res, want)
    with pytest.raises(ValueError, match="res must be"):
        matmul.gated_residual_(res.to(torch.bfloat16), x, w, r)
    with pytest.raises(ValueError, match="r must be"):
        matmul.gated_residual_(res, x, w, r.float())


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(4, 64, dtype=bf16), torch.zeros(32, 64)), "bfloat16"),
        ((torch.zeros(4, 64), torch.zeros(32, 64, dtype=bf16)), "bfloat16"),
        ((torch.zeros(4, 64, dtype=bf16), torch.zeros(32, 96, dtype=bf16)), "does not match"),
        ((torch.zeros(4, 48, dtype=bf16), torch.zeros(32, 48, dtype=bf16)), "multiples of 32"),
        ((torch.zeros(4, 64, dtype=bf16), torch.zeros(40, 64, dtype=bf16)), "multiples of 32"),
        ((torch.zeros(4, 64, dtype=bf16), torch.zeros(2, 32, 64, dtype=bf16)), r"\[N, K\]"),
        ((torch.zeros(4, 64, dtype=bf16), torch.zeros(32, 64, dtype=bf16), "gelu"), "epilogue"),
    ],
)
def test_linear_checks_its_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        matmul.linear(*args)


def test_linear_layer_uses_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = matmul.linear
    monkeypatch.setattr(matmul, "linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    layer = common.Linear(64, 96).to(bf16)
    with torch.no_grad():
        layer(torch.randn(1, 40, 64))  # cast to bf16, 40 rows: the kernel
        layer(torch.randn(1, 1, 64))  # one row: torch.mv
        layer(torch.randn(1, 31, 64))  # too few rows
        common.Linear(64, 80).to(bf16)(torch.randn(64, 64))  # N % 32 != 0
        common.Linear(64, 96)(torch.randn(64, 64))  # fp32 weights
    layer(torch.randn(1, 40, 64))  # parameters want gradients: F.linear
    assert calls == [torch.Size([1, 40, 64])]
    with torch.no_grad(), kernels.using(kernels.Kernels(amx_matmul=False)):
        layer(torch.randn(1, 40, 64))
    assert len(calls) == 1
    with torch.no_grad():
        y = layer.forward_relu2(torch.randn(64, 64))
    assert len(calls) == 2 and (y >= 0).all()


def _logits(model, tokens, enabled):
    model.set_kernels(amx_matmul=enabled)
    with torch.no_grad():
        return model(tokens)[0]


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_model_logits_with_and_without_the_kernel(version, tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    random_checkpoint(version, 2, 128, 300, head_size=32, ffn_dim=256, seed=version, path=path)
    model = rwkvkit.load(path, dtype=bf16)
    tokens = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(0))
    want = _logits(model, tokens, False)
    calls = []
    real = matmul.linear
    monkeypatch.setattr(matmul, "linear", lambda *a, **k: calls.append(k) or real(*a, **k))
    got = _logits(model, tokens, True)
    assert len(calls) >= 2 * 4 and {"epilogue": "relu2"} in calls  # the blocks' matrices, the fused key
    assert (got - want).abs().max() / want.abs().max() <= 2.0**-7  # MODEL_TOL[bf16] of test_ops_fused
