"""The fused CPU kernels (rwkvkit.ops.fused, the Finch WKV decay path of rwkvkit.ops.native) against the
PyTorch code they replace, kernel by kernel and as whole models (fused vs unfused, v4/v5/v6, fp32/bf16).

Tolerances. The kernels are compiled without FMA contraction, so the token-shift mixes, relu^2 and
the gating compute torch's expressions with torch's roundings. What may differ: GroupNorm sums in
another order, and exp (sigmoid, silu, the Finch decay) is the kernels' own, within about 1 ulp of
torch's. fp32 results therefore agree to a few ulps (bound 2e-6 relative to the largest value). bf16
results are identical except where such a difference sits on a bf16 rounding boundary: then they
differ by one bf16 ulp. The kernel tests bound the size (one ulp) and share (under 1%) of those.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import rwkvkit
from rwkvkit.models.common import fusable, group_norm, make_ln_x, token_shift
from rwkvkit.ops import fused, native, wkv6_naive
from rwkvkit.testing import random_checkpoint

pytestmark = pytest.mark.skipif(not fused.available(), reason="fused CPU kernels not built")
bf16 = torch.bfloat16
DTYPES = [torch.float32, bf16]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: within 2e-6 of the largest value; bf16: equal but for rare one-ulp rounding flips."""
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    g, w = got.float(), want.float()
    scale = w.abs().max().clamp_min(1e-6)
    if dtype == torch.float32:
        assert (g - w).abs().max() / scale < 2e-6
        return
    diff = (g - w).abs()
    ulp = torch.maximum(g.abs(), w.abs()) * 2.0**-7  # a bf16 ulp is at most 2^-7 of the value
    assert (diff <= ulp).all(), f"off by more than one bf16 ulp: {diff.max()}"
    assert (diff > 0).float().mean() < 0.01


def test_one_openmp_runtime_is_loaded():
    maps = open("/proc/self/maps").read()
    assert len(set(re.findall(r"\S*libgomp\S*", maps))) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 7, 300])
@pytest.mark.parametrize("form", ["finch", "lerp"])
def test_shift_mix(dtype, T, form):
    g = torch.Generator().manual_seed(T)
    B, C, M = 2, 96, 3
    x, prev = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
    p = token_shift(x, prev)
    mix = torch.rand(M, C, generator=g)
    m = mix.view(M, 1, 1, C)
    want = (torch.addcmul(x, p - x, m) if form == "finch" else x * m + p * (1 - m)).to(dtype)
    assert_close(fused.shift_mix(x, prev, mix, lerp=form == "lerp", dtype=dtype), want, dtype)


def _finch_mix_case(B, T, C, D, lora_dtype=torch.float32):
    """Inputs of finch_mix (m and w2 in lora_dtype) and the model's unfused expression, in fp32."""
    g = torch.Generator().manual_seed(T)
    x, prev = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
    m = torch.tanh(torch.randn(B, T, 5 * D, generator=g)).to(lora_dtype)
    w2, maa = (torch.randn(5, D, C, generator=g) * 0.3).to(lora_dtype), torch.rand(5, C, generator=g)
    # one baddbmm for the five LoRA products (on the fp32 values), one addcmul
    mix = torch.baddbmm(maa.view(5, 1, C), m.float().view(B * T, 5, D).transpose(0, 1), w2.float())
    return (x, prev, m, w2, maa), torch.addcmul(x, token_shift(x, prev) - x, mix.view(5, B, T, C))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,D", [(1, 1, 64, 32), (2, 13, 96, 32), (1, 70, 80, 8)])  # partial blocks too
def test_finch_mix(dtype, B, T, C, D):
    args, want = _finch_mix_case(B, T, C, D)
    assert_close(fused.finch_mix(*args, dtype), want.to(dtype), dtype)


# partial blocks of rows (32 per AMX block) and columns (32 per step, 16 per tile), D under, over and
# not a multiple of one 32-input tile step
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,T,C,D", [(1, 1, 64, 32), (2, 45, 100, 32), (1, 70, 80, 8), (2, 33, 40, 64), (1, 9, 48, 40)]
)
def test_finch_mix_bf16_lora(dtype, B, T, C, D):
    """m and maa_w2 in bf16, as in a bf16 model: the kernel takes them as they are (AMX tile products
    where the CPU has them). Their products are exact in fp32 and summed in fp32, so against the fp32
    expression on the same values only the summation order differs: the tolerance of fp32 inputs."""
    args, want = _finch_mix_case(B, T, C, D, bf16)
    assert_close(fused.finch_mix(*args, dtype), want.to(dtype), dtype)


def test_finch_mix_bf16_lora_without_amx(tmp_path):
    """With RWKVKIT_PORTABLE_KERNELS=1 (and on CPUs without AMX) bf16 m and maa_w2 are upcast and take
    the fp32 path: bit for bit the result of passing them as fp32."""
    args, want = _finch_mix_case(2, 45, 100, 40, bf16)
    torch.save(args, tmp_path / "args.pt")
    code = (
        "import sys, torch\n"
        "from rwkvkit.ops import fused\n"
        "assert fused._fused_cpu.finch_mix_amx == 0\n"
        "args = torch.load(sys.argv[1])\n"
        "torch.save([fused.finch_mix(*args, dt) for dt in (torch.float32, torch.bfloat16)], sys.argv[2])\n"
    )
    env = dict(os.environ, RWKVKIT_PORTABLE_KERNELS="1")
    cmd = [sys.executable, "-c", code, str(tmp_path / "args.pt"), str(tmp_path / "out.pt")]
    subprocess.run(cmd, check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    x, prev, m, w2, maa = args
    for got, dtype in zip(torch.load(tmp_path / "out.pt"), DTYPES):
        assert torch.equal(got, fused.finch_mix(x, prev, m.float(), w2.float(), maa, dtype))
        assert_close(got, want.to(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,N", [(1, 1, 2, 64), (2, 33, 3, 32), (1, 200, 12, 64)])
def test_group_norm_gate(dtype, B, T, H, N):
    g = torch.Generator().manual_seed(T)
    C = H * N
    y = torch.randn(B, T, C, generator=g) * 3 + 1
    gate = torch.randn(B, T, C, generator=g).to(dtype)
    ln = make_ln_x(type("Cfg", (), {"n_head": H, "n_embd": C})())
    with torch.no_grad():
        ln.weight.normal_(generator=g)
        ln.bias.normal_(generator=g)
    want = (group_norm(y, H, ln) * F.silu(gate)).to(dtype)  # the model's unfused expression
    got = fused.group_norm_gate(y, gate, ln.weight, ln.bias, H, ln.eps, dtype)
    assert_close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_square_is_exact(dtype):
    k = torch.randn(3, 5000, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = torch.relu(k).square()
    assert torch.equal(fused.relu_square_(k), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out", [None, torch.float32])
def test_sigmoid_mul(dtype, out):
    g = torch.Generator().manual_seed(1)
    r, v = (torch.randn(2, 70, 96, generator=g).mul(4).to(dtype) for _ in range(2))
    want = torch.sigmoid(r) * v  # rounded to r's dtype, as in ChannelMix
    got = fused.sigmoid_mul(r, v, out)
    assert got.dtype == (out or dtype)
    assert_close(got.to(dtype), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_mul_adds_the_residual_exactly(dtype):
    g = torch.Generator().manual_seed(2)
    r, v = (torch.randn(2, 70, 96, generator=g).mul(4).to(dtype) for _ in range(2))
    x = torch.randn(2, 70, 96, generator=g)
    want = x + fused.sigmoid_mul(r, v, torch.float32)
    got = fused.sigmoid_mul_add_(x, r, v)
    assert got is x and torch.equal(x, want)
    with pytest.raises(ValueError, match="float32"):
        fused.sigmoid_mul_add_(x.to(bf16), r, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("add_dtype", [None, torch.float32, bf16])
@pytest.mark.parametrize("form", ["finch", "lerp"])
@pytest.mark.parametrize("B,T", [(2, 37), (1, 1), (3, 2)])  # thread boundaries inside and between rows
def test_add_norm_mix(dtype, add_dtype, form, B, T):
    g = torch.Generator().manual_seed(T)
    C, M = 96, 2
    x, prev = torch.randn(B, T, C, generator=g) * 3, torch.randn(B, C, generator=g)
    add = None if add_dtype is None else torch.randn(B, T, C, generator=g).to(add_dtype)
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    mix = torch.rand(M, C, generator=g)
    s_want = x if add is None else x + add
    n = F.layer_norm(s_want, (C,), w, b, 1e-5)
    p, mv = token_shift(n, prev), mix.view(M, 1, 1, C)
    mixes = (torch.addcmul(n, p - n, mv) if form == "finch" else n * mv + p * (1 - mv)).to(dtype)
    s, got, last, normed = fused.add_norm_mix(
        x, add, w, b, 1e-5, prev, mix, lerp=form == "lerp", dtype=dtype, want_normed=True
    )
    assert torch.equal(s, s_want)  # the add is torch's: one fp32 rounding
    assert_close(normed, n, torch.float32)  # the LayerNorm sums in another order
    assert torch.equal(last, normed[:, -1])
    assert_close(got, mixes, dtype)
    assert fused.add_norm_mix(x, add, w, b, 1e-5, prev, mix, lerp=False, dtype=dtype)[3] is None


@pytest.mark.skipif(not fused.lora_available(), reason="needs AMX-BF16")
@pytest.mark.parametrize("R", [1, 31, 32, 77, 512])
@pytest.mark.parametrize("second", [False, True])
def test_lora_tanh_matches_the_pytorch_roundings(R, second):
    g = torch.Generator().manual_seed(R)
    K, D, N = 96, 64, 80
    x = torch.randn(2, R, K, generator=g).to(bf16)
    w1 = (torch.randn(K, D, generator=g) * 0.3).to(bf16)
    w2 = (torch.randn(D, N, generator=g) * 0.5).to(bf16) if second else None
    want = torch.tanh(x @ w1)  # bf16 product, bf16 tanh, as the unfused model
    if second:
        want = want @ w2
    got = fused.lora_tanh(x, w1, w2)
    assert got.shape == want.shape and got.dtype == bf16
    # products are exact and summed in fp32 (another order than oneDNN's); tanh is the kernel's own
    assert_close(got, want, bf16)


def test_lora_tanh_refuses_what_it_cannot_take():
    x, w1 = torch.zeros(4, 96, dtype=bf16), torch.zeros(96, 64, dtype=bf16)
    assert not fused.lora_fits(x.float(), w1)  # fp32
    assert not fused.lora_fits(x, torch.zeros(96, 40, dtype=bf16), torch.zeros(40, 16, dtype=bf16))  # D % 32
    assert not fused.lora_fits(x[:, :80], w1[:80])  # K % 32
    if fused.lora_available():
        with pytest.raises(ValueError, match="lora_tanh"):
            fused.lora_tanh(x, w1.float())


def test_kernels_check_their_inputs():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError):
        fused.shift_mix(x, torch.randn(2, 8), torch.rand(1, 8), lerp=False, dtype=torch.float32)
    with pytest.raises(ValueError):
        fused.shift_mix(x, torch.randn(1, 8), torch.rand(1, 8), lerp=False, dtype=torch.float16)
    with pytest.raises(ValueError):
        fused.sigmoid_mul(x, x.to(bf16))
    with pytest.raises(ValueError):
        fused.relu_square_(x.transpose(1, 2))
    w = torch.ones(8)
    with pytest.raises(ValueError, match="add"):
        fused.add_norm_mix(x, x[:, :2], w, w, 1e-5, torch.zeros(1, 8), w.view(1, 8), lerp=False, dtype=bf16)
    with pytest.raises(ValueError, match="prev"):
        fused.add_norm_mix(x, None, w, w, 1e-5, torch.zeros(2, 8), w.view(1, 8), lerp=False, dtype=bf16)


@pytest.mark.parametrize("rkv_dtype", DTYPES)
@pytest.mark.parametrize("shift", [-3.0, 0.0, 4.0])  # 4: time_decay + ww up to ~8, decays of e^-3000
def test_native_finch_decay_matches_naive(rkv_dtype, shift):
    g = torch.Generator().manual_seed(int(shift) + 10)
    B, T, H, N = 2, 40, 2, 64
    r, k, v = (torch.randn(B, T, H, N, generator=g).to(rkv_dtype) for _ in range(3))
    ww = torch.randn(B, T, H, N, generator=g).to(rkv_dtype)
    td = torch.randn(1, 1, H * N, generator=g) + shift
    u, s0 = torch.randn(H, N, generator=g), torch.randn(B, H, N, N, generator=g)
    w = -torch.exp(td.view(H, N) + ww.float())
    want_y, want_s = wkv6_naive(r.float(), k.float(), v.float(), w, u, s0)
    y, s = native.wkv6_native_finch(r, k, v, ww, td, u, s0)
    assert (y - want_y).abs().max() / want_y.abs().max().clamp_min(1.0) < 1e-5
    assert (s - want_s).abs().max() / want_s.abs().max().clamp_min(1.0) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [64, 32])  # the AVX-512 N = 64 kernel and the generic one
def test_native_finch_group_norm_gate_epilogue(dtype, N):
    g = torch.Generator().manual_seed(N)
    B, T, H = 2, 30, 3
    C = H * N
    r, k, v, ww = (torch.randn(B, T, H, N, generator=g).to(dtype) for _ in range(4))
    td, u = torch.randn(C, generator=g), torch.randn(H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g)
    gate = torch.randn(B, T, C, generator=g).to(dtype)
    ln = make_ln_x(type("Cfg", (), {"n_head": H, "n_embd": C})())
    with torch.no_grad():
        ln.weight.normal_(generator=g)
        ln.bias.normal_(generator=g)
    y, s = native.wkv6_native_finch(r, k, v, ww, td, u, s0)
    want = (group_norm(y.reshape(B, T, C), H, ln) * F.silu(gate)).to(dtype)  # the unfused model's steps
    gn = native.GroupNormGate(gate, ln.weight, ln.bias, ln.eps, dtype)
    got, s2 = native.wkv6_native_finch(r, k, v, ww, td, u, s0, gn)
    assert torch.equal(s, s2)
    assert_close(got.reshape(B, T, C), want, dtype)


# ---- whole models: fused vs unfused --------------------------------------------------------------

# worst logit difference allowed, relative to the largest logit. fp32: the few-ulp differences grow
# through 2 layers and the head to ~5e-7 (bound 5e-6). bf16: the logits are the head's bf16 outputs,
# and in these cases they come out identical; a rare one-ulp flip of an activation can move a logit by
# at most one bf16 ulp of the largest logit, 2^-7 of it (the bound).
MODEL_TOL = {torch.float32: 5e-6, bf16: 2.0**-7}


def _run(model, tokens, enabled: bool):
    """Whole-sequence logits and state, and the logits of the last token decoded as a T == 1 step."""
    model.set_kernels(fused=enabled)
    with torch.no_grad():
        whole, state = model(tokens)
        _, prefix = model(tokens[:, :-1])
        step, _ = model(tokens[:, -1:], prefix)
    return whole, state, step


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_model_fused_matches_unfused(version, dtype, tmp_path):
    path = tmp_path / "m.pth"
    random_checkpoint(version, 2, 128, 300, head_size=32, ffn_dim=256, seed=version, path=path)
    model = rwkvkit.load(path, dtype=dtype)
    tokens = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(0))
    want, want_state, want_step = _run(model, tokens, enabled=False)
    got, got_state, got_step = _run(model, tokens, enabled=True)
    scale = want.abs().max()
    assert (got - want).abs().max() / scale <= MODEL_TOL[dtype]
    assert (got_step - want_step).abs().max() / scale <= MODEL_TOL[dtype]  # the T == 1 path
    for name, t in want_state.tensors.items():
        d = (got_state.tensors[name].float() - t.float()).abs().max() / t.float().abs().max().clamp_min(1.0)
        assert d <= MODEL_TOL[dtype], name


def test_models_fall_back_when_the_extension_is_missing(tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    random_checkpoint(6, 1, 64, 50, head_size=32, path=path)
    model = rwkvkit.load(path, dtype=bf16)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want, _ = model(tokens)
        monkeypatch.setattr(fused, "_fused_cpu", None)
        assert not fused.available() and not fusable(model.blocks[0].att, torch.zeros(1, 1, 64), bf16)
        got, _ = model(tokens)  # the PyTorch path
    assert (got - want).abs().max() / want.abs().max() <= MODEL_TOL[bf16]


def test_fused_path_is_skipped_when_training(tmp_path):
    path = tmp_path / "m.pth"
    random_checkpoint(6, 1, 64, 50, head_size=32, path=path)
    model = rwkvkit.load(path, fold_ln0=False)  # trainable parameters
    x, att = torch.randn(1, 3, 64), model.blocks[0].att
    assert not fusable(att, x, torch.float32)
    with torch.no_grad():
        assert fusable(att, x, torch.float32)
        assert not fusable(att, x, torch.float16)
    # training through the model reaches every time-mix parameter (the PyTorch path ran)
    model.loss(torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 5]])).backward()
    assert all(p.grad is not None for p in att.parameters())


def test_tensor_subclasses_are_not_handed_to_the_kernels():
    """FSDP2 shards parameters as DTensors, whose data pointer is only the local shard: the kernels and
    the block's fused path must not take any tensor subclass."""

    class Sub(torch.Tensor):
        pass

    t = torch.zeros(4, 64)
    assert fused.plain(t, torch.nn.Parameter(t), None)
    assert not fused.plain(t, t.as_subclass(Sub))
    assert not fused.usable(t.as_subclass(Sub))
    from rwkvkit.ops import decode, matmul

    w = torch.zeros(64, 64, dtype=bf16)
    assert not matmul.applies(torch.zeros(32, 64, dtype=bf16), w.as_subclass(Sub))
    assert decode.matrix_kind(w.as_subclass(Sub)) is None
