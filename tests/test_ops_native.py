"""The native CPU WKV kernel against the naive PyTorch loop (the source of truth)."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.ops import native, wkv6_naive

pytestmark = pytest.mark.skipif(not native.available(), reason="native WKV kernel not built")


@pytest.mark.parametrize(
    "B,T,H,N,shift",
    [
        (1, 1, 1, 4, 0.0),
        (3, 1, 2, 64, 0.0),
        (2, 17, 2, 8, -2.0),
        (1, 300, 3, 16, 1.0),
        (2, 65, 2, 64, 3.0),
        (1, 40, 1, 4, 7.0),
    ],
)
@pytest.mark.parametrize("per_token", [True, False], ids=["finch-decay", "eagle-decay"])
def test_native_matches_naive(B, T, H, N, shift, per_token):
    g = torch.Generator().manual_seed(B * 1000 + T)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    w = -torch.exp(torch.randn(B, T, H, N, generator=g) + shift)  # shift 7: decays of ~e^-1000
    if not per_token:
        w = w[0, 0]
    u = torch.randn(H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g)
    s0_before = s0.clone()
    want_y, want_s = wkv6_naive(r, k, v, w.expand(B, T, H, N), u, s0)
    y, s = native.wkv6_native(r, k, v, w, u, s0)
    assert torch.equal(s0, s0_before)  # the incoming state is not modified
    scale = want_y.abs().max().clamp_min(1.0)
    assert (y - want_y).abs().max() / scale < 1e-5
    assert (s - want_s).abs().max() / want_s.abs().max().clamp_min(1.0) < 1e-5


def test_native_is_skipped_when_gradients_are_needed():
    r = torch.randn(1, 4, 1, 4, requires_grad=True)
    assert not native.usable(r)
    with torch.no_grad():
        assert native.usable(r)
    assert native.usable(torch.randn(1, 4, 1, 4))


@pytest.mark.parametrize("T", [7, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("groupnorm", [False, True], ids=["y", "groupnorm"])
def test_native_n64_is_bit_identical_however_the_prompt_is_split(T, dtype, groupnorm):
    """N = 64 (on AVX-512 the kernel that takes two tokens per pass over the state, an odd last token
    alone): a prompt run whole and the same prompt run in pieces of 1 and of 3 tokens, the state
    carried, give exactly the same outputs and final state."""
    B, H, N = 2, 3, 64
    g = torch.Generator().manual_seed(T)
    r, k, v, ww, gate = (torch.randn(B, T, H, N, generator=g).to(dtype) for _ in range(5))
    td = torch.randn(H * N, generator=g) * 0.5 - 1
    u = torch.randn(H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g)
    ln_w, ln_b = torch.randn(H * N, generator=g), torch.randn(H * N, generator=g)

    def run(a, b, s):
        gn = native.GroupNormGate(gate[:, a:b], ln_w, ln_b, 64e-5, dtype) if groupnorm else None
        return native.wkv6_native_finch(r[:, a:b], k[:, a:b], v[:, a:b], ww[:, a:b], td, u, s, gn)

    want_y, want_s = run(0, T, s0)
    for piece in (1, 3):
        s, ys = s0, []
        for a in range(0, T, piece):
            y, s = run(a, min(a + piece, T), s)
            ys.append(y)
        assert torch.equal(torch.cat(ys, dim=1), want_y)
        assert torch.equal(s, want_s)
