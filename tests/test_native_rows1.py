"""One row's matrix kernels of the native step (rwkvkit/ops/_decode_rows1.c): bf16 weights by VDPBF16PS on
x split into two bf16 parts, int8 (Q8_0) by VPDPBUSD on x as two 8-bit digits of a 16-bit number per
block, fp16 widened by VCVTPH2PS; against an fp64 product of the dequantised weights, with tolerances
derived from how much of x each kernel keeps (a wrong block scale, digit or tail is far outside them),
on odd shapes, with the dot kernels on and off (the widening kernels of CPUs without AVX512_BF16 /
VNNI). And fp16 models: their one-token calls take the native step (layer rescaling in the plan)."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit import kernels
from rwkvkit.models import common, rwkv6, rwkv7
from rwkvkit.models.quant import Int8Linear
from rwkvkit.ops import decode as native
from rwkvkit.testing import random_checkpoint

pytestmark = pytest.mark.skipif(not native.available(), reason="native decode kernels not built")

SHAPES = [
    (7, 64),
    (13, 96),
    (33, 768),
    (5, 4096),
    (66, 3072),
    (3, 32),
]  # rows not multiples of 4; K % 64 = 32


@pytest.fixture(params=[True, False], ids=["dot", "widen"])
def rowdot(request):
    native.configure(kernels.PORTABLE, rowdot=request.param)
    yield request.param
    native.configure(kernels.PORTABLE)


def _x(K: int, g: torch.Generator, M: int = 1) -> torch.Tensor:
    """Blocks of 32 of very different magnitudes (1e-3 .. 1e2, shuffled) and one all-zero block: the
    per-block scales matter."""
    mags = torch.logspace(-3, 2, K // 32)[torch.randperm(K // 32, generator=g)]
    x = torch.randn(M, K, generator=g) * mags.repeat_interleave(32)
    if K >= 64:
        x[:, 32:64] = 0
    return x


def _check(y: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    err = (y.double() - want).abs()
    assert (err <= bound).all(), (
        f"{what}: error {err.max().item():.3g} above its bound {bound.min().item():.3g}"
    )


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("M", [1, 3])
def test_dense_rows_match_fp64(rowdot, N, K, M):
    g = torch.Generator().manual_seed(N * K + M)
    x = _x(K, g, M)
    W = torch.randn(N, K, generator=g) / 10
    for dt in (torch.bfloat16, torch.float16):
        w = W.to(dt)
        want = x.double() @ w.double().T
        scale = x.double().abs() @ w.double().abs().T  # sum |x w| per output
        y = native.dense_matmul(x, w)
        # bf16 dot: x kept to ~2^-17 relative (xh + xl); fp16 / widened: exact products; fp32 sums
        rel = 2.0**-16 if dt == torch.bfloat16 and M == 1 and native._decode_cpu.dot_bf16 else 0.0
        _check(y, want, scale * (rel + K * 2.0**-23) + 1e-30, f"{dt} {N}x{K} M={M}")


@pytest.mark.parametrize("N,K", SHAPES)
def test_q8_rows_match_fp64(rowdot, N, K):
    g = torch.Generator().manual_seed(N + K)
    x = _x(K, g)
    W = torch.randn(N, K, generator=g) * torch.logspace(-2, 1, K)  # block scales that differ
    lin = Int8Linear(W)
    wd = lin.weight_int8.double() * lin.scale.double().repeat_interleave(32, 1)
    want = x.double() @ wd.T
    scale = x.double().abs() @ wd.abs().T
    # the digits keep x to half a step of absmax / 32639 per block of 32
    step = x.double().view(1, K // 32, 32).abs().amax(-1) / 32639 / 2  # [1, K / 32]
    quant = (wd.abs().view(N, K // 32, 32).sum(-1) * step).sum(-1)  # [N]
    dot = native._decode_cpu.dot_vnni
    bound = scale * K * 2.0**-23 + (quant * 1.01 if dot else 0) + 1e-30
    y = native.q8_matmul(x, lin.weight_int8, lin.scale)
    _check(y, want, bound, f"q8 {N}x{K}")
    if dot:  # the digits carry ~16 bits of x: far more than 8 (8-bit x: errors ~256x the bound)
        assert ((y.double() - want).abs() / scale).max().item() < 1e-4


def test_q8_digits_at_the_extremes(rowdot):
    """Values at the block's absmax (xq = +-32639: the high digit's limit), exact powers of two, a lone
    non-zero value, and inputs whose quantised digits all carry (xq = 256 k - 128)."""
    K = 128
    x = torch.zeros(1, K)
    x[0, :32] = torch.tensor([1.0, -1.0] * 16)  # every value at +-absmax
    x[0, 32] = 3.5  # lone value
    x[0, 64:96] = torch.linspace(-1, 1, 32) * 1e-20  # tiny block
    carry = [32639.0, -32639.0] + [256.0 * k - 128 for k in range(-120, 120, 8)]  # low digit -128
    x[0, 96:] = torch.tensor(carry[:32]) / 32639.0 * 0.75
    W = torch.randint(-127, 128, (9, K)).float()
    W[:, :32] = 127
    W[1, :32] = -127
    lin = Int8Linear(W)
    wd = lin.weight_int8.double() * lin.scale.double().repeat_interleave(32, 1)
    want = x.double() @ wd.T
    scale = x.double().abs() @ wd.abs().T
    y = native.q8_matmul(x, lin.weight_int8, lin.scale)
    assert ((y.double() - want).abs() / scale).max().item() < 1e-4


def test_prepared_inputs_follow_each_matrix(rowdot):
    """Several int8 matrices of different K in one call sequence: each gets its own prepared x."""
    g = torch.Generator().manual_seed(7)
    for K in (64, 4096, 96, 768):
        x = _x(K, g)
        lin = Int8Linear(torch.randn(40, K, generator=g))
        wd = lin.weight_int8.double() * lin.scale.double().repeat_interleave(32, 1)
        want = x.double() @ wd.T
        y = native.q8_matmul(x, lin.weight_int8, lin.scale)
        assert ((y.double() - want).abs() / (x.double().abs() @ wd.abs().T)).max().item() < 1e-4


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """8 layers: the fp16 rescaling (x halved after every 6th block) takes effect."""
    d = tmp_path_factory.mktemp("r1")
    out = {}
    for version in (5, 6, 7):
        out[version] = d / f"v{version}.pth"
        random_checkpoint(version, 8, 128, 500, head_size=32, seed=version, path=out[version])
    return out


def _steps(model, tokens: torch.Tensor, **kw):
    state, outs = None, []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t : t + 1], state, **kw)
            outs.append(logits[:, 0].float())
    return torch.stack(outs, 1)


@pytest.mark.parametrize("version", [5, 6, 7])
def test_fp16_models_take_the_native_step(deep, version):
    fp16 = rwkvkit.load(deep[version], dtype=torch.float16)
    assert fp16.rescale_every == 6
    line = next(s for s in fp16.describe().splitlines() if "one-token step" in s)
    assert "native one-call C step" in line and "not faster" not in line and "fp16" in line
    tokens = torch.randint(0, 500, (2, 8), generator=torch.Generator().manual_seed(version))
    got = _steps(fp16, tokens)
    assert fp16.native_step() is not None  # the step really ran
    torch16 = _steps(fp16.set_kernels(native_step=False), tokens)  # fp16 activations
    fp32 = _steps(rwkvkit.load(deep[version]), tokens)
    spread = fp32.std().item()
    # float32 activations over fp16 weights: closer to the fp32 model than the fp16 modules are
    assert (got - fp32).abs().mean().item() <= (torch16 - fp32).abs().mean().item() * 1.1 + 1e-4
    assert (got - torch16).abs().mean().item() <= 0.01 * spread
    assert (got - torch16).abs().max().item() <= 0.1 * spread


@pytest.mark.parametrize("version", [6, 7])
def test_fp16_step_on_the_portable_kernels(deep, version):
    """The plain C kernels (CPUs without AVX-512) take fp16 matrices and LoRAs too: same logits up to
    the order of sums."""
    fp16 = rwkvkit.load(deep[version], dtype=torch.float16)
    tokens = torch.randint(0, 500, (1, 4), generator=torch.Generator().manual_seed(3))
    fast = _steps(fp16, tokens)
    before = kernels.PORTABLE
    try:
        kernels.set_portable(True)
        plain = _steps(fp16, tokens)
    finally:
        kernels.set_portable(before)
    assert fp16.native_step() is not None
    assert (plain - fast).abs().max().item() <= 5e-5 * max(1.0, fast.abs().max().item())


@pytest.mark.parametrize("version", [6, 7])
@pytest.mark.parametrize("T", [5, 40])  # 5: the row kernels; 40: the widened fp32 GEMM
def test_fp16_prompts_run_as_fp32_products(deep, version, T, monkeypatch):
    """fp16 prompts on the CPU (matrices and LoRAs) give PyTorch's own fp16 products' logits up to the
    order of sums: fp16 inputs, fp32 sums, fp16 outputs, without its scalar fp16 GEMM."""
    fp16 = rwkvkit.load(deep[version], dtype=torch.float16)
    tokens = torch.randint(0, 500, (2, T), generator=torch.Generator().manual_seed(T))
    widened = []
    real = common._widened_linear
    monkeypatch.setattr(common, "_widened_linear", lambda x, w: widened.append(1) or real(x, w))
    with torch.no_grad():
        fast = fp16(tokens)[0].float()
    assert bool(widened) == (2 * T > 16)  # the path asked for really ran
    torch_fp16 = lambda x, w: x.to(w.dtype) @ w  # noqa: E731
    monkeypatch.setattr(common, "_widened_linear", torch.nn.functional.linear)
    monkeypatch.setattr(common, "_ROW_KERNEL", False)
    monkeypatch.setattr(rwkv6, "lora_mm", torch_fp16)
    monkeypatch.setattr(rwkv7, "lora_mm", torch_fp16)
    with torch.no_grad():
        slow = fp16(tokens)[0].float()
    spread = slow.std().item()
    assert (fast - slow).abs().mean().item() <= 2e-3 * spread
    assert (fast - slow).abs().max().item() <= 0.05 * spread
    with torch.no_grad():
        fp32 = rwkvkit.load(deep[version])(tokens)[0]
    assert (fast - fp32).abs().mean().item() <= (slow - fp32).abs().mean().item() * 1.1  # as close to fp32


@pytest.mark.skipif(not native.available(), reason="native decode kernels not built")
def test_fp16_rows_widen_every_bit_pattern_exactly() -> None:
    """The one-row fp16 kernel widens weights with integer ops: every one of the 65536 fp16 patterns
    (subnormals, inf, NaN included) gives x @ W^T as fp32 products would, also with denormals-are-zero
    set on the thread, as the native step sets it (the kernel clears it around its multiply)."""
    bits = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16)
    w = bits.view(torch.float16).reshape(1024, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the work on this thread, whose MXCSR set_flush_denormal sets
    try:
        for daz in (False, True):
            assert torch.set_flush_denormal(daz)
            for i in range(64):
                x = torch.nn.functional.one_hot(torch.tensor([i]), 64).float()
                got, want = native.dense_matmul(x, w)[0], (x @ w.float().t())[0]
                assert bool(((got == want) | (got.isnan() & want.isnan())).all()), (daz, i)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
