"""WKV-6 and WKV-7 on CUDA: flash-linear-attention's kernels (backend "fla") against the naive loop in
fp64 (forward, final state, every gradient), and their timings beside the torch forms (``pytest -s``).

Skipped without CUDA or without the ``fla`` extra. Errors are read as fla's own tests read them: the
RMS of the difference over the RMS of the truth. fla's fp32 kernels may use TF32 tensor-core dots
(Triton's default for fp32), its bf16 ones bf16 dots; the tolerances allow for both.
"""

from __future__ import annotations

import time
from functools import partial

import pytest
import torch

from rwkvkit.ops import fla_kernels, wkv6, wkv7
from rwkvkit.ops.wkv7 import describe_backend
from tests.test_ops_wkv import inputs6
from tests.test_ops_wkv7 import inputs7


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    err = fla_kernels._import_error()
    return None if err is None else f"flash-linear-attention not importable ({err}): {fla_kernels.INSTALL}"


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

TOL = {torch.float32: 0.01, torch.bfloat16: 0.04}  # RMS error ratio; twice that for the decay's gradient


def rms_ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (diff / expected.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _cuda(xs, dtype):
    """Inputs on the GPU in `dtype`, the state in fp32 (as the model keeps it)."""
    *ins, s = xs
    return [x.cuda().to(dtype) for x in ins] + [s.cuda()]


def _run(op, xs, backend, seed=0):
    """(y, state, grads of <y, gy> + <state, gs> for every input) for fixed random cotangents."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y, s = op(*xs, backend=backend)
    g = torch.Generator(device="cuda").manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, device="cuda", dtype=torch.float64)
    gs = torch.randn(s.shape, generator=g, device="cuda", dtype=torch.float64)
    ((y.double() * gy).sum() + (s.double() * gs).sum()).backward()
    return y.detach(), s.detach(), [x.grad for x in xs]


def _compare(op, xs, names, dtype, decay_name):
    y, s, grads = _run(op, xs, "fla")
    # the truth: the naive loop in fp64 on the very values fla was given
    y0, s0, grads0 = _run(op, [x.double() for x in xs], "naive")
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    errs = {"y": rms_ratio(y, y0), "state": rms_ratio(s, s0)}
    errs.update({f"d{n}": rms_ratio(g, g0) for n, g, g0 in zip(names, grads, grads0)})
    print(f"\n{op.__name__} {str(dtype).removeprefix('torch.')} B,T,H,N={tuple(xs[0].shape)}: "
          + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))  # fmt: skip
    for k, v in errs.items():
        tol = TOL[dtype] * (2 if k == f"d{decay_name}" else 1)
        assert v <= tol, f"{op.__name__} {dtype} {k}: RMS error ratio {v:.3g} > {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wkv7_fla_matches_naive(dtype):
    # T = 200: not a multiple of fla's chunk; model decays (both extremes and between), kk-normalised a/b
    xs = _cuda(inputs7(2, 200, 4, 64, "model", seed=1), dtype)
    assert describe_backend(*xs)[0] == "fla"
    _compare(wkv7, xs, "r w k v a b state".split(), dtype, "w")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wkv6_fla_matches_naive(dtype):
    r, k, v, w, u, s = inputs6(2, 200, 4, 64, "realistic", seed=2)  # Finch decays, to exp(-20) per token
    xs = [*(x.cuda().to(dtype) for x in (r, k, v, w, u)), s.cuda()]

    def op(r, k, v, w, u, s, backend):
        return wkv6(r, k, v, w, u, s, backend=backend)

    op.__name__ = "wkv6"
    _compare(op, xs, "r k v w u state".split(), dtype, "w")


def _ms(fn, repeat: int = 5) -> float:
    fn()  # compile / autotune
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _fwd_bwd(call, backend: str) -> None:
    y, s = call(backend)
    (y.sum() + s.sum()).backward()


def test_print_timings():
    """Best-of-5 wall times of one layer's WKV at the 0.1B shape (H = 12, N = 64), B = 4, T = 1024,
    bf16 inputs: fla vs the torch chunked form (and the naive loop, forward only, once)."""
    B, T, H, N = 4, 1024, 12, 64
    x7 = [x.requires_grad_() for x in _cuda(inputs7(B, T, H, N, seed=3), torch.bfloat16)]
    r, k, v, w, u, s = inputs6(B, T, H, N, "mild", seed=4)
    x6 = [x.cuda().to(torch.bfloat16).requires_grad_() for x in (r, k, v, w, u)] + [s.cuda().requires_grad_()]
    calls = {"wkv7": lambda b: wkv7(*x7, backend=b), "wkv6": lambda b: wkv6(*x6, backend=b)}
    print(f"\nGPU {torch.cuda.get_device_name()}, B={B} T={T} H={H} N={N}, bf16 inputs, best of 5, ms")
    for name, call in calls.items():
        row = {}
        for backend in ("fla", "chunked"):
            with torch.no_grad():
                row[f"{backend} fwd"] = _ms(partial(call, backend))
            row[f"{backend} fwd+bwd"] = _ms(partial(_fwd_bwd, call, backend))
        with torch.no_grad():
            row["naive fwd"] = _ms(partial(call, "naive"), repeat=1)
        print(f"{name}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
        assert all(v > 0 for v in row.values())
