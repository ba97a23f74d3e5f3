"""WKV-7: the reference's per-token math -> naive loop -> chunked form (outputs, final state, state
carried across calls, decays at the model's extremes, long sequences) and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwkvkit.ops import wkv5, wkv6, wkv7, wkv7_naive
from rwkvkit.ops.wkv7 import describe_backend
from tests.test_ops_wkv import assert_close_rel, d64, inputs6

W_MIN = -math.exp(-0.5)  # the model's most negative log decay per token


def log_decay7(shape, kind: str, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """w < 0. model: -exp(-0.5) * sigmoid(z), z ~ N(0, 3^2) (the model's form, decays over the whole
    range); slow: w in [-1e-6, -1e-9] (no forgetting); fast: w within 1e-6 of -exp(-0.5) (the
    strongest decay the model can make); ends: each token at random slow or fast; strong: beyond the
    model, -exp(U(-6, 3)) (Finch-like, chunks take the hierarchical path)."""
    if kind == "model":
        return W_MIN * torch.sigmoid(torch.randn(shape, generator=gen, dtype=dtype) * 3)
    if kind == "slow":
        return -torch.exp(torch.rand(shape, generator=gen, dtype=dtype) * -math.log(1e3) - math.log(1e6))
    if kind == "fast":
        return W_MIN * torch.sigmoid(torch.rand(shape, generator=gen, dtype=dtype) * 2 + 14)
    if kind == "ends":
        pick = torch.rand(shape, generator=gen) < 0.5
        return torch.where(pick, log_decay7(shape, "slow", gen, dtype), log_decay7(shape, "fast", gen, dtype))
    assert kind == "strong", kind
    return -torch.exp(torch.rand(shape, generator=gen, dtype=dtype) * 9 - 6)


def inputs7(B, T, H, N, decay="model", ab="kk", seed=0, dtype=torch.float32, with_state=True):
    """(r, w, k, v, a, b, state). ab="kk": as the model makes them, a = -kk, b = kk * a_coef with kk
    L2-normalised per head and a_coef in (0, 1); ab="raw": independent random a, b of norm ~1."""
    gen = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=gen, dtype=dtype) for _ in range(3))
    w = log_decay7((B, T, H, N), decay, gen, dtype)
    if ab == "kk":
        kk = F.normalize(torch.randn(B, T, H, N, generator=gen, dtype=dtype), dim=-1)
        a, b = -kk, kk * torch.sigmoid(torch.randn(B, T, H, N, generator=gen, dtype=dtype) * 2)
    else:
        a, b = (torch.randn(B, T, H, N, generator=gen, dtype=dtype) / math.sqrt(N) for _ in range(2))
    s = torch.randn(B, H, N, N, generator=gen, dtype=dtype) if with_state else None
    return r, w, k, v, a, b, s


# ---------------------------------------------------------------- naive vs the reference's math


def reference_v7_loop(r, w, k, v, kk, a_coef, state):
    """The rwkv package's RWKV_x070_TMix_one / _seq WKV lines, one batch row [T, H, N], its layout:
    vk = v^T k, ab = (-kk)^T (kk * a), state = state * w + state @ ab + vk, y = state @ r, with w the
    decay factor (already exponentiated)."""
    T, H, N = r.shape
    out = torch.empty(T, H, N, dtype=r.dtype)
    for t in range(T):
        vk = v[t].view(H, N, 1) @ k[t].view(H, 1, N)
        ab = (-kk[t]).view(H, N, 1) @ (kk[t] * a_coef[t]).view(H, 1, N)
        state = state * w[t].view(H, 1, N) + state @ ab + vk
        out[t] = (state @ r[t].view(H, N, 1)).view(H, N)
    return out, state


def test_naive_matches_the_reference_math():
    gen = torch.Generator().manual_seed(1)
    B, T, H, N = 2, 37, 3, 8
    r, w, k, v, _, _, s = inputs7(B, T, H, N, seed=1)
    kk = F.normalize(torch.randn(B, T, H, N, generator=gen), dim=-1)
    a_coef = torch.sigmoid(torch.randn(B, T, H, N, generator=gen))
    y, sT = wkv7(r, w, k, v, -kk, kk * a_coef, s, backend="naive")
    for bi in range(B):
        yr, sr = reference_v7_loop(r[bi], torch.exp(w[bi]), k[bi], v[bi], kk[bi], a_coef[bi], s[bi])
        torch.testing.assert_close(y[bi], yr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sT[bi], sr, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- chunked vs naive, forward

SHAPES = [(1, 1, 1, 4), (2, 1, 2, 64), (3, 15, 2, 8), (1, 16, 1, 16), (2, 17, 2, 8), (1, 63, 2, 64),
          (2, 64, 1, 4), (1, 65, 3, 8), (2, 130, 2, 16), (1, 300, 1, 64)]  # fmt: skip


@pytest.mark.parametrize(("B", "T", "H", "N"), SHAPES)
@pytest.mark.parametrize(
    ("decay", "ab"), [("model", "kk"), ("ends", "kk"), ("model", "raw"), ("strong", "kk")]
)
def test_chunked_and_naive_match_fp64(B, T, H, N, decay, ab):
    xs = inputs7(B, T, H, N, decay, ab, seed=T * 10 + N, with_state=bool(T % 2))
    y64, s64 = wkv7(*d64(xs), backend="naive")
    for backend in ("chunked", "naive"):
        y, sT = wkv7(*xs, backend=backend)
        assert y.dtype == torch.float32 and sT.dtype == torch.float32
        assert y.shape == (B, T, H, N) and sT.shape == (B, H, N, N)
        tag = f"{backend} B={B} T={T} H={H} N={N} {decay} {ab}"
        assert_close_rel(y, y64, rtol=2e-5, what=f"y {tag}")
        assert_close_rel(sT, s64, rtol=2e-5, what=f"state {tag}")


@pytest.mark.parametrize("chunk_size", [16, 32, 48, 128])
@pytest.mark.parametrize("decay", ["fast", "model"])
def test_chunk_sizes(chunk_size, decay):
    """128-token chunks at the strongest decays span ~-78: the hierarchical path; 16..64 the flat one."""
    xs = inputs7(2, 150, 2, 8, decay, seed=5)
    y64, s64 = wkv7(*d64(xs), backend="naive")
    y, sT = wkv7(*xs, chunk_size=chunk_size)
    assert_close_rel(y, y64, rtol=2e-5, what="y")
    assert_close_rel(sT, s64, rtol=2e-5, what="state")


@pytest.mark.parametrize("decay", ["slow", "fast", "ends"])
def test_long_sequences_at_the_extremes_stay_finite_and_exact(decay):
    """2000 tokens (32 chunks) at the model's weakest and strongest decays and a mix of both."""
    xs = inputs7(1, 2000, 2, 16, decay, seed=6)
    y64, s64 = wkv7(*d64(xs), backend="naive")
    y, sT = wkv7(*xs)
    assert_close_rel(y, y64, rtol=5e-5, what=f"y {decay}")
    assert_close_rel(sT, s64, rtol=5e-5, what=f"state {decay}")


def test_model_transition_keeps_the_state_bounded():
    """With nothing written (v = 0), the model's transitions diag(exp(w)) - kk^T (kk a_coef) do not
    grow the state (spectral radius <= 1), whatever the decays, in every backend."""
    r, w, k, v, a, b, s = inputs7(1, 3000, 2, 16, "slow", seed=7)
    v = torch.zeros_like(v)
    for backend in ("chunked", "naive"):
        _, sT = wkv7(r, w, k, v, a, b, s, backend=backend)
        assert torch.isfinite(sT).all()
        assert sT.norm() <= 1.5 * s.norm(), backend


@pytest.mark.parametrize("backend", ["naive", "chunked", "auto"])
def test_state_carry_and_no_mutation(backend):
    r, w, k, v, a, b, s = xs = inputs7(2, 100, 2, 8, seed=8)
    s_before = s.clone()
    y, sT = wkv7(*xs, backend=backend)
    assert torch.equal(s, s_before)
    for t1 in (1, 37, 64, 99):
        y1, s1 = wkv7(*(x[:, :t1] for x in xs[:6]), s, backend=backend)
        y2, s2 = wkv7(*(x[:, t1:] for x in xs[:6]), s1, backend=backend)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s2, sT, rtol=1e-5, atol=1e-5)


def test_zero_state_equals_none_and_low_precision_inputs():
    xs = inputs7(2, 40, 2, 8, seed=9, with_state=False)
    y1, s1 = wkv7(*xs[:6], None)
    y2, s2 = wkv7(*xs[:6], torch.zeros(2, 2, 8, 8))
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    y3, s3 = wkv7_naive(*xs[:6])  # the twin: wkv7's signature, the naive backend
    y4, s4 = wkv7(*xs[:6], backend="naive")
    assert torch.equal(y3, y4) and torch.equal(s3, s4)
    xb = [x.bfloat16() for x in xs[:6]]
    y, sT = wkv7(*xb)
    assert y.dtype == torch.float32 and sT.dtype == torch.float32
    y32, s32 = wkv7(*(x.float() for x in xb), backend="naive")
    assert_close_rel(y, y32, rtol=2e-5, what="y")
    assert_close_rel(sT, s32, rtol=2e-5, what="state")


# ---------------------------------------------------------------- arguments and the backend choice


def test_bad_arguments_raise_named_errors():
    r, w, k, v, a, b, s = inputs7(2, 5, 2, 4)
    cases = [
        ((r[0], w, k, v, a, b, s), {}, "r must be"),
        ((r, w[:, :4], k, v, a, b, s), {}, "w must"),
        ((r, w, k[..., :3], v, a, b, s), {}, "k must"),
        ((r, w, k, v[:, :, :1], a, b, s), {}, "v must"),
        ((r, w, k, v, a[:1], b, s), {}, "a must"),
        ((r, w, k, v, a, b.long(), s), {}, "b must be a floating"),
        ((r, w, k, v, a, b, s[0]), {}, "state must"),
        ((r, w, k, v, a, b, s), {"backend": "cuda"}, "backend"),
        ((r, w, k, v, a, b, s), {"chunk_size": 24}, "chunk_size"),
        ((r, w, k, v, a, b, s), {"backend": "fla"}, "fla"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            wkv7(*args, **kw)


def test_fla_backend_is_refused_clearly_off_cuda():
    """backend="fla" names what is missing (CUDA tensors, or the extra), for wkv5/6 as for wkv7."""
    r, k, v, w, u, s = inputs6(1, 5, 2, 4)
    with pytest.raises(ValueError, match="fla"):
        wkv6(r, k, v, w, u, s, backend="fla")
    with pytest.raises(ValueError, match="fla"):
        wkv5(r, k, v, w[0, 0], u, s, backend="fla")
    assert describe_backend(*inputs7(1, 5, 2, 4))[0] != "fla"


def test_empty_sequence_returns_the_state_unchanged():
    r, w, k, v, a, b, s = inputs7(2, 0, 2, 4)
    for backend in ("chunked", "naive", "auto"):
        y, sT = wkv7(r, w, k, v, a, b, s, backend=backend)
        assert y.shape == (2, 0, 2, 4) and torch.equal(sT, s) and sT is not s


def test_auto_backend_choice_is_reported():
    xs = inputs7(1, 5, 1, 4)
    name, why = describe_backend(*xs)
    assert name in ("native", "chunked") and why
    one = [x[:, :1] for x in xs[:6]]
    grad = [x.clone().requires_grad_() for x in one]
    assert describe_backend(*grad)[0] == "naive"
    assert describe_backend(*(x.clone().requires_grad_() for x in xs[:6]))[0] == "chunked"
    y, _ = wkv7(*grad, backend="auto")
    y.sum().backward()  # the naive form: differentiable
    assert all(x.grad is not None for x in grad)
