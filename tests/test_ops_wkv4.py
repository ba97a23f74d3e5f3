"""RWKV-4 WKV: the reference step -> naive -> chunked, on outputs, state (aa, bb, pp) and gradients."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.ops import wkv4
from tests.test_ops_wkv import assert_close_rel


def inputs4(B, T, C, seed=0, kscale=3.0, dtype=torch.float32, with_state=False):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, C, generator=gen, dtype=dtype) * kscale
    v = torch.randn(B, T, C, generator=gen, dtype=dtype)
    w = -torch.exp(torch.rand(C, generator=gen, dtype=dtype) * 8 - 5)  # -exp(time_decay), v4 init range
    u = torch.randn(C, generator=gen, dtype=dtype)
    st = None
    if with_state:
        aa = torch.randn(B, C, generator=gen, dtype=dtype)
        bb = torch.rand(B, C, generator=gen, dtype=dtype) + 0.1
        pp = torch.randn(B, C, generator=gen, dtype=dtype) * 5
        st = (aa, bb, pp)
    return w, u, k, v, st


def reference_att_seq_loop(w, u, k, v, aa, bb, pp):
    """The wkv loop of the rwkv package's RWKV.att_seq (one batch row, [T, C]), transcribed."""
    T = k.shape[0]
    sx = torch.empty_like(k)
    for t in range(T):
        kk = k[t]
        vv = v[t]
        ww = u + kk
        p = torch.maximum(pp, ww)
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        sx[t] = (e1 * aa + e2 * vv) / (e1 * bb + e2)
        ww = w + pp
        p = torch.maximum(ww, kk)
        e1 = torch.exp(ww - p)
        e2 = torch.exp(kk - p)
        aa = e1 * aa + e2 * vv
        bb = e1 * bb + e2
        pp = p
    return sx, aa, bb, pp


def assert_state_close(st, ref, rtol=1e-5, steps=1):
    """(aa, bb, pp) are equal up to the representation: compare aa e^(pp - pp_ref) etc.
    An fp32 exponent pp carries absolute error ~|pp| * 2^-24 per rounding, so the represented
    values aa e^pp can only be as exact as that: the tolerance grows with |pp| and with the number
    of sequential updates of pp (T for the reference step, the number of blocks when chunked)."""
    aa, bb, pp = st
    ra, rb, rp = (x.to(aa.dtype) for x in ref)
    rtol = rtol + (8 + 2 * steps) * 2.0**-24 * float(rp.abs().max())
    assert_close_rel(pp, rp, rtol=rtol, what="pp")
    scale = torch.exp(pp - rp)
    assert_close_rel(aa * scale, ra, rtol=rtol, what="aa")
    assert_close_rel(bb * scale, rb, rtol=rtol, what="bb")


def test_naive_is_the_reference_step_exactly():
    w, u, k, v, _ = inputs4(2, 40, 16, seed=1)
    y, (aa, bb, pp) = wkv4(w, u, k, v, backend="naive")
    for b in range(2):
        z = torch.zeros(16)
        ry, ra, rb, rp = reference_att_seq_loop(w, u, k[b], v[b], z, z, torch.full((16,), -1e30))
        assert torch.equal(y[b], ry)
        assert torch.equal(aa[b], ra) and torch.equal(bb[b], rb) and torch.equal(pp[b], rp)


@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 63, 64, 65, 130, 300])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_and_naive_match_fp64(T, with_state):
    for B, C, kscale in ((1, 8, 3.0), (3, 5, 30.0)):
        xs = inputs4(B, T, C, seed=T, kscale=kscale, with_state=with_state)
        w, u, k, v, st = xs
        y64, st64 = wkv4(
            w.double(), u.double(), k.double(), v.double(), None if st is None else st, backend="naive"
        )
        # both follow the reference step, which re-rounds pp + w every token: fp32 drift grows with T
        for backend, rtol in (("chunked", 1e-4), ("naive", 1e-4)):
            y, st1 = wkv4(*xs, backend=backend)
            assert y.dtype == torch.float32 and y.shape == (B, T, C)
            assert_close_rel(y, y64, rtol=rtol, what=f"y {backend} T={T}")
            assert_state_close(st1, st64, rtol=rtol, steps=T)


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_chunked_stable_for_large_k_and_strong_decay(chunk_size):
    w, u, k, v, _ = inputs4(2, 90, 8, seed=3, kscale=300.0)
    w = torch.cat([w[:4], torch.full((4,), -50.0)])
    y, st = wkv4(w, u, k, v, chunk_size=chunk_size)
    y64, st64 = wkv4(w.double(), u.double(), k.double(), v.double(), backend="naive")
    assert_close_rel(y, y64, what="y")
    assert_state_close(st, st64, steps=90)


@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_state_carry_and_no_mutation(backend):
    w, u, k, v, st = inputs4(2, 70, 8, seed=4, with_state=True)
    before = [x.clone() for x in st]
    y, sT = wkv4(w, u, k, v, st, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(st, before))
    for t1 in (1, 16, 33):
        y1, s1 = wkv4(w, u, k[:, :t1], v[:, :t1], st, backend=backend)
        y2, s2 = wkv4(w, u, k[:, t1:], v[:, t1:], s1, backend=backend)
        assert_close_rel(torch.cat([y1, y2], 1), y, what="y")
        assert_state_close(s2, sT)


@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_gradcheck_fp64(backend):
    w, u, k, v, st = inputs4(1, 11, 3, seed=5, dtype=torch.float64, with_state=True)
    fn = lambda w, u, k, v, aa, bb, pp: wkv4(w, u, k, v, (aa, bb, pp), backend=backend, chunk_size=4)
    # y and the state (aa, bb, pp) are all outputs; pp is a max, differentiable away from ties
    xs = [x.requires_grad_() for x in (w, u, k, v, *st)]
    assert torch.autograd.gradcheck(lambda *a: (fn(*a)[0], *fn(*a)[1]), xs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T", [17, 300])
def test_fp32_grads_match_fp64_naive(T):
    xs = inputs4(2, T, 8, seed=6, with_state=True)
    w, u, k, v, st = xs

    def grads(backend, dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (w, u, k, v, *st)]
        y, (aa, bb, pp) = wkv4(*leaves[:4], tuple(leaves[4:]), backend=backend)
        gen = torch.Generator().manual_seed(0)
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
        # a loss on the represented values aa e^pp, bb e^pp (pp alone is representation-dependent)
        loss = (y * gy).sum() + (aa * torch.exp(pp - 5)).sum() + (bb * torch.exp(pp - 5)).sum()
        loss.backward()
        return [x.grad for x in leaves]

    for name, a, e in zip(
        "w u k v aa bb pp".split(), grads("chunked", torch.float32), grads("naive", torch.float64)
    ):
        assert_close_rel(a, e, rtol=2e-5, what=f"d{name}")
