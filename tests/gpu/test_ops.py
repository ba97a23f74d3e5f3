"""The WKV ops on the GPU: chunked vs naive in fp32, outputs, final state and the gradient of every
input, both within 1e-4 (relative) of an fp64 naive run, at decays from realistic to extreme."""

from __future__ import annotations

import math

import pytest
import torch

from rwkvkit.ops import wkv5, wkv6

LIMIT = 1e-4  # relative to fp64 (the CPU suite holds 1e-5 forward, 2e-5 gradients)
NAMES = ("y", "S", "dr", "dk", "dv", "dw", "du", "ds")


def log_decay(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    """w <= 0: realistic -exp(U[-6, 3]); mild -exp(U[-6, -1]); extreme: magnitudes log-uniform over
    1e-6..1e3 with runs of exactly -1e3 and -1e-6; mixed: mild except the last head, extreme."""
    if kind == "realistic":
        return -torch.exp(torch.rand(shape, generator=gen) * 9 - 6)
    if kind == "mild":
        return -torch.exp(torch.rand(shape, generator=gen) * 5 - 6)
    if kind == "mixed":
        w = log_decay(shape, "mild", gen)
        w[..., -1, :] = log_decay(tuple(w[..., -1, :].shape), "extreme", gen)
        return w
    w = -torch.exp(torch.rand(shape, generator=gen) * math.log(1e9) - math.log(1e6))
    pick = torch.rand(shape, generator=gen)
    w = torch.where(pick < 0.15, torch.full_like(w, -1e3), w)
    return torch.where(pick > 0.7, torch.full_like(w, -1e-6), w)


def rel_err(a: torch.Tensor, e: torch.Tensor) -> float:
    """max |a - e| / (|e| + max|e|) (the max term covers cancellations)."""
    a, e = a.double().cpu(), e.double().cpu()
    return float(((a - e).abs() / (e.abs() + e.abs().max().clamp_min(1e-30))).max())


@pytest.mark.parametrize(
    "op,kind", [("wkv6", "realistic"), ("wkv6", "extreme"), ("wkv6", "mixed"), ("wkv5", "extreme")]
)
def test_chunked_and_naive_match_fp64(sizes, report, op, kind):
    dev = sizes.device
    B, T, H, N = sizes.ops_shape
    gen = torch.Generator().manual_seed(100 + ("realistic", "extreme", "mixed").index(kind) + (op == "wkv5"))
    r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
    w = log_decay((B, T, H, N) if op == "wkv6" else (H, N), kind, gen)
    u = torch.randn(H, N, generator=gen)
    s = torch.randn(B, H, N, N, generator=gen)
    gy = torch.randn(B, T, H, N, generator=gen, dtype=torch.float64)
    gs = torch.randn(B, H, N, N, generator=gen, dtype=torch.float64)
    fn = wkv6 if op == "wkv6" else wkv5
    res = {}
    for label, dtype, backend in (
        ("chunked", torch.float32, "chunked"),
        ("naive", torch.float32, "naive"),
        ("fp64", torch.float64, "naive"),
    ):
        xs = [x.to(dev, dtype).detach().clone().requires_grad_() for x in (r, k, v, w, u, s)]
        y, sT = fn(*xs, backend=backend)
        ((y * gy.to(dev, y.dtype)).sum() + (sT * gs.to(dev, sT.dtype)).sum()).backward()
        res[label] = [y.detach(), sT.detach()] + [x.grad for x in xs]
    rel_c = [rel_err(a, e) for a, e in zip(res["chunked"], res["fp64"])]
    rel_n = [rel_err(a, e) for a, e in zip(res["naive"], res["fp64"])]
    diffs = [float((a - b).abs().max()) for a, b in zip(res["chunked"], res["naive"])]
    report(
        f"ops {op} {kind} B={B} T={T} H={H} N={N} {dev}: |chunked - naive| "
        + " ".join(f"{n} {d:.1e}" for n, d in zip(NAMES, diffs))
        + f" | rel vs fp64: chunked {max(rel_c):.1e} ({NAMES[rel_c.index(max(rel_c))]}) naive {max(rel_n):.1e}"
    )
    assert all(bool(torch.isfinite(t).all()) for lab in ("chunked", "naive") for t in res[lab])
    assert max(rel_c + rel_n) <= LIMIT
