"""WKV ops: gradients of every input (fp64 gradcheck; fp32 chunked vs fp64 naive) and argument checks."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.ops import wkv4, wkv5, wkv6
from tests.test_ops_wkv import assert_close_rel, d64, inputs6


def _loss_grads(fn, xs, gen):
    """Gradients of <y, gy> + <state, gs> w.r.t. every tensor input, for fixed random cotangents."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y, s = fn(*xs)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    ((y * gy).sum() + (s * gs).sum()).backward()
    return [x.grad for x in xs]


@pytest.mark.parametrize(
    ("backend", "kind"),
    [("chunked", "realistic"), ("chunked", "extreme"), ("chunked", "mixed"), ("naive", "extreme")],
)
def test_v6_gradcheck_fp64(backend, kind):
    # T = 37 with chunk 32: two chunks, a padded tail, all three levels inside a chunk;
    # "mixed" (T = 24, chunk 16): head 0 takes the one-matmul path, head 1 the hierarchical one
    T, H = (24, 2) if kind == "mixed" else (37, 1)
    xs = d64(inputs6(1, T, H, 2, kind, seed=11))
    fn = lambda r, k, v, w, u, s: wkv6(r, k, v, w, u, s, backend=backend, chunk_size=32 if T > 30 else 16)
    xs = [x.requires_grad_() for x in xs]
    # mixed: a random projection of the Jacobian (fast mode) keeps the file fast; fp32 tests cover it fully
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=kind == "mixed")


@pytest.mark.parametrize("backend", ["chunked", "naive"])
def test_v5_gradcheck_fp64(backend):
    r, k, v, _, u, s = d64(inputs6(2, 20, 1, 2, seed=12))
    w = -torch.exp(torch.randn(1, 2, dtype=torch.float64))
    fn = lambda r, k, v, w, u, s: wkv5(r, k, v, w, u, s, backend=backend, chunk_size=16)
    xs = [x.requires_grad_() for x in (r, k, v, w, u, s)]
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("T", "B", "H", "N"), [(17, 3, 2, 4), (64, 1, 1, 64), (130, 2, 2, 8), (300, 1, 2, 16)]
)
@pytest.mark.parametrize("kind", ["realistic", "extreme", "mixed"])
def test_v6_fp32_grads_match_fp64_naive(T, B, H, N, kind):
    xs = inputs6(B, T, H, N, kind, seed=T + N)
    g64 = _loss_grads(lambda *a: wkv6(*a, backend="naive"), d64(xs), torch.Generator().manual_seed(0))
    g32 = _loss_grads(lambda *a: wkv6(*a, backend="chunked"), xs, torch.Generator().manual_seed(0))
    for name, a, e in zip("r k v w u state".split(), g32, g64):
        assert_close_rel(a, e, rtol=2e-5, what=f"d{name}")


def test_v6_naive_fp32_grads_match_fp64():
    xs = inputs6(2, 70, 2, 8, "extreme", seed=13)
    g64 = _loss_grads(lambda *a: wkv6(*a, backend="naive"), d64(xs), torch.Generator().manual_seed(0))
    g32 = _loss_grads(lambda *a: wkv6(*a, backend="naive"), xs, torch.Generator().manual_seed(0))
    for name, a, e in zip("r k v w u state".split(), g32, g64):
        assert_close_rel(a, e, rtol=2e-5, what=f"d{name}")


# ---------------------------------------------------------------- argument checks


def test_v6_bad_arguments_raise_named_errors():
    r, k, v, w, u, s = inputs6(2, 5, 2, 4)
    cases = [
        ((r[0], k, v, w, u, s), {}, "r must be"),
        ((r, k[:, :4], v, w, u, s), {}, "k must"),
        ((r, k, v[..., :3], w, u, s), {}, "v must"),
        ((r, k, v, w[:, :, 0], u, s), {}, "w must"),
        ((r, k, v, w, u[0], s), {}, "u must"),
        ((r, k, v, w, u, s[0]), {}, "state must"),
        ((r, k, v, w, u, s), {"backend": "cuda"}, "backend"),
        ((r, k, v, w, u, s), {"chunk_size": 24}, "chunk_size"),
        ((r.long(), k, v, w, u, s), {}, "r must be a floating"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            wkv6(*args, **kw)
    with pytest.raises(ValueError, match=r"w must have shape \[H, N\]"):
        wkv5(r, k, v, w, u, s)


def test_v4_bad_arguments_raise_named_errors():
    k, v = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    w, u = -torch.ones(8), torch.zeros(8)
    st = (torch.zeros(2, 8), torch.zeros(2, 8), torch.full((2, 8), -1e30))
    cases = [
        ((w[:4], u, k, v, st), "w must"),
        ((w, u[None], k, v, st), "u must"),
        ((w, u, k[0], v, st), "k must"),
        ((w, u, k, v[:, :3], st), "v must"),
        ((w, u, k, v, st[:2]), "state must"),
        ((w, u, k, v, (st[0][0], st[1], st[2])), "state aa"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            wkv4(*args)


def test_empty_sequences_return_the_state_unchanged():
    r, k, v, w, u, s = inputs6(2, 0, 2, 4)
    y, sT = wkv6(r, k, v, w, u, s)
    assert y.shape == (2, 0, 2, 4) and torch.equal(sT, s) and sT is not s
    kk, vv = torch.zeros(2, 0, 8), torch.zeros(2, 0, 8)
    y4, (aa, bb, pp) = wkv4(-torch.ones(8), torch.zeros(8), kk, vv)
    assert (
        y4.shape == (2, 0, 8) and torch.equal(pp, torch.full((2, 8), -1e30)) and not aa.any() and not bb.any()
    )
