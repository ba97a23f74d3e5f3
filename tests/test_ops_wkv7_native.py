"""The native CPU WKV-7 kernel against the naive PyTorch loop (the source of truth)."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.ops import wkv7, wkv7_naive, wkv7_native
from rwkvkit.ops.wkv7 import describe_backend
from tests.test_ops_wkv import assert_close_rel
from tests.test_ops_wkv7 import inputs7

pytestmark = pytest.mark.skipif(not wkv7_native.available(), reason="native WKV-7 kernel not built")


@pytest.mark.parametrize(
    ("B", "T", "H", "N", "decay"),
    [(1, 1, 1, 4, "model"), (3, 1, 2, 64, "model"), (2, 3, 2, 64, "ends"), (2, 17, 2, 8, "ends"),
     (1, 300, 3, 16, "model"), (2, 65, 2, 64, "ends"), (1, 40, 1, 20, "strong"), (2, 33, 3, 64, "strong")],
)  # fmt: skip
@pytest.mark.parametrize("portable", [False, True], ids=["best", "portable"])
def test_native_matches_naive(B, T, H, N, decay, portable):
    r, w, k, v, a, b, s0 = inputs7(B, T, H, N, decay, seed=B * 1000 + T)
    s0_before = s0.clone()
    want_y, want_s = wkv7_naive(r, w, k, v, a, b, s0)
    y, s = wkv7_native.wkv7_native(r, w, k, v, a, b, s0, portable=portable)
    assert torch.equal(s0, s0_before)  # the incoming state is not modified
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert_close_rel(y, want_y, rtol=1e-5, what="y")
    assert_close_rel(s, want_s, rtol=1e-5, what="state")


@pytest.mark.parametrize("N", [64, 8])
def test_native_reads_bf16_and_mixed_dtypes_as_they_are(N):
    """bf16 inputs are read as bf16 (no cast pass); fp16 is cast to fp32 first; any mix works."""
    xs = inputs7(2, 21, 2, N, seed=3)
    s0 = xs[6]
    for dtypes in ([torch.bfloat16] * 6, [torch.bfloat16, torch.float32] * 3, [torch.float16] * 6):
        ins = [x.to(dt) for x, dt in zip(xs[:6], dtypes)]
        want_y, want_s = wkv7_naive(*(x.float() for x in ins), s0)
        y, s = wkv7_native.wkv7_native(*ins, s0)
        assert_close_rel(y, want_y, rtol=1e-5, what=f"y {dtypes[:2]}")
        assert_close_rel(s, want_s, rtol=1e-5, what=f"state {dtypes[:2]}")


def test_native_threads_and_splits():
    """Enough work for the threaded path. Calls of >= 4 tokens run the key-major sequence pass, whose
    every token's operations are the same whatever the split: pieces of 7 and 16 tokens, the state
    carried, give exactly the bits of the whole. Shorter calls (decode) run the row step on the
    state as it is: pieces of 1 and 3 tokens agree to fp32 rounding."""
    B, T, H, N = 2, 160, 4, 64
    xs = inputs7(B, T, H, N, seed=4)
    y, s = wkv7_native.wkv7_native(*xs)
    want_y, want_s = wkv7_naive(*xs)
    assert_close_rel(y, want_y, rtol=1e-5, what="y")
    for step in (7, 16, 1, 3):
        st, ys = xs[6], []
        for t0 in range(0, T, step):
            yt, st = wkv7_native.wkv7_native(*(x[:, t0 : t0 + step] for x in xs[:6]), st)
            ys.append(yt)
        if step >= 4:
            assert torch.equal(torch.cat(ys, 1), y) and torch.equal(st, s), step
        else:
            assert_close_rel(torch.cat(ys, 1), want_y, rtol=1e-5, what=f"y in pieces of {step}")
            assert_close_rel(st, want_s, rtol=1e-5, what=f"state in pieces of {step}")


def test_native_at_extreme_decays():
    """Decays far beyond the model's (exp(-1e3) = 0 in fp32) and at its weakest: finite and exact."""
    r, w, k, v, a, b, s0 = inputs7(1, 50, 2, 64, seed=5)
    for wv in (-1e3, -1e-9):
        w = torch.full_like(w, wv)
        y, s = wkv7_native.wkv7_native(r, w, k, v, a, b, s0)
        want_y, want_s = wkv7_naive(r, w, k, v, a, b, s0)
        assert_close_rel(y, want_y, rtol=1e-5, what=f"y w={wv}")
        assert_close_rel(s, want_s, rtol=1e-5, what=f"state w={wv}")


def test_auto_takes_native_only_for_inference():
    xs = inputs7(1, 9, 2, 8, seed=6)
    assert describe_backend(*xs)[0] == "native"
    with torch.no_grad():
        y, s = wkv7(*xs, backend="auto")
    want_y, want_s = wkv7(*xs, backend="naive")
    assert_close_rel(y, want_y, rtol=1e-5, what="y")
    r = xs[0].clone().requires_grad_()
    assert describe_backend(r, *xs[1:])[0] == "chunked"
    with torch.no_grad():
        assert describe_backend(r, *xs[1:])[0] == "native"
    with pytest.raises(ValueError, match="native"):
        wkv7(r, *xs[1:], backend="native")
    assert describe_backend(*(x.double() for x in xs))[0] == "chunked"  # fp64 stays in PyTorch
