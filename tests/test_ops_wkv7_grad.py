"""WKV-7 gradients: fp64 gradcheck of both differentiable forms, and every gradient (r, w, k, v, a, b,
state) of the fp32 chunked form against the fp64 naive loop."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.ops import wkv7
from tests.test_ops_wkv import assert_close_rel, d64
from tests.test_ops_wkv7 import inputs7

NAMES = "r w k v a b state".split()


def _loss_grads(fn, xs, gen):
    """Gradients of <y, gy> + <state, gs> w.r.t. every tensor input, for fixed random cotangents."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y, s = fn(*xs)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s.dtype)
    ((y * gy).sum() + (s * gs).sum()).backward()
    return [x.grad for x in xs]


@pytest.mark.parametrize(
    ("backend", "decay", "ab"),
    [
        ("chunked", "model", "kk"),
        ("chunked", "ends", "raw"),
        ("chunked", "strong", "kk"),
        ("naive", "model", "kk"),
    ],
)
def test_gradcheck_fp64(backend, decay, ab):
    # T = 20 with chunk 16: two chunks and a padded tail; "strong" decays take the hierarchical path
    # (chunk 32: both of its levels). The full Jacobian for the model's case, a random projection of
    # it (fast mode) for the others, to keep the file fast; the naive loop on 12 tokens.
    T, L = {"naive": (12, 16), "chunked": (37, 32) if decay == "strong" else (20, 16)}[backend]
    xs = [x.requires_grad_() for x in d64(inputs7(1, T, 1, 3, decay, ab, seed=11))]
    fn = lambda *args: wkv7(*args, backend=backend, chunk_size=L)
    fast = (decay, ab) != ("model", "kk")
    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize(
    ("T", "B", "H", "N"), [(1, 2, 1, 4), (17, 3, 2, 4), (64, 1, 1, 64), (130, 2, 2, 8), (300, 1, 1, 16)]
)
@pytest.mark.parametrize(
    ("decay", "ab"), [("model", "kk"), ("ends", "kk"), ("model", "raw"), ("strong", "kk")]
)
def test_fp32_chunked_grads_match_fp64_naive(T, B, H, N, decay, ab):
    xs = inputs7(B, T, H, N, decay, ab, seed=T + N)
    g64 = _loss_grads(lambda *a: wkv7(*a, backend="naive"), d64(xs), torch.Generator().manual_seed(0))
    g32 = _loss_grads(lambda *a: wkv7(*a, backend="chunked"), xs, torch.Generator().manual_seed(0))
    for name, a, e in zip(NAMES, g32, g64):
        assert a.dtype == torch.float32
        assert_close_rel(a, e, rtol=3e-5, what=f"d{name} T={T} {decay} {ab}")


def test_naive_fp32_grads_match_fp64():
    xs = inputs7(2, 70, 2, 8, "ends", seed=13)
    g64 = _loss_grads(lambda *a: wkv7(*a, backend="naive"), d64(xs), torch.Generator().manual_seed(0))
    g32 = _loss_grads(lambda *a: wkv7(*a, backend="naive"), xs, torch.Generator().manual_seed(0))
    for name, a, e in zip(NAMES, g32, g64):
        assert_close_rel(a, e, rtol=3e-5, what=f"d{name}")


def test_grads_flow_through_a_carried_state():
    """Two calls with the state carried give the gradients of one call."""
    xs = inputs7(1, 50, 2, 8, seed=14)
    g_one = _loss_grads(lambda *a: wkv7(*a), xs, torch.Generator().manual_seed(1))

    def two_calls(r, w, k, v, a, b, s):
        y1, s1 = wkv7(r[:, :20], w[:, :20], k[:, :20], v[:, :20], a[:, :20], b[:, :20], s)
        y2, s2 = wkv7(r[:, 20:], w[:, 20:], k[:, 20:], v[:, 20:], a[:, 20:], b[:, 20:], s1)
        return torch.cat([y1, y2], 1), s2

    g_two = _loss_grads(two_calls, xs, torch.Generator().manual_seed(1))
    for name, a, e in zip(NAMES, g_two, g_one):
        assert_close_rel(a, e, rtol=1e-5, what=f"d{name}")
