"""WKV op speed: naive loop vs chunked form vs native C kernel, forward and forward+backward, 0.1B shapes.

    rwkvkit bench ops [--T 512] [--threads 2] [--repeat 5] [--no-naive-backward] [--versions 7,6,5,4]

Goose/Finch/Eagle: B=1, H=12, N=64 (C=768); RWKV-4: C=768. Goose (wkv7) takes the model's decays
(-exp(-0.5) * sigmoid(z)) and kk-normalised a, b. Inputs fp32 and bf16 (r, k, v; the op computes in
fp32). Prints best-of-``repeat`` wall times per layer call and the speedup of chunked over naive.
Shared machines are noisy: best-of timing and ratios from one run are what to read.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..cli_args import csv_choices, non_negative_int, positive_int
from ..ops import native, wkv4, wkv5, wkv6, wkv7, wkv7_native


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _inputs(version: int, T: int, dtype: torch.dtype, gen: torch.Generator, mild: bool) -> list[torch.Tensor]:
    B, H, N = 1, 12, 64
    if version == 4:
        k = torch.randn(B, T, H * N, generator=gen) * 3
        v = torch.randn(B, T, H * N, generator=gen)
        w = -torch.exp(torch.rand(H * N, generator=gen) * 8 - 5)
        return [w, torch.randn(H * N, generator=gen), k.to(dtype), v.to(dtype)]
    r, k, v = (torch.randn(B, T, H, N, generator=gen).to(dtype) for _ in range(3))
    if version == 7:
        w = -math.exp(-0.5) * torch.sigmoid(torch.randn(B, T, H, N, generator=gen) * 2)
        kk = F.normalize(torch.randn(B, T, H, N, generator=gen), dim=-1)
        a_coef = torch.sigmoid(torch.randn(B, T, H, N, generator=gen))
        return [r, w.to(dtype), k, v, (-kk).to(dtype), (kk * a_coef).to(dtype)]
    shape = (B, T, H, N) if version == 6 else (H, N)
    # -exp(ww): ww in [-6, -1] (RWKV-LM init; every chunk takes the one-matmul path) or in [-6, 3]
    # (strong decays as in trained Finch; chunks take the hierarchical path)
    w = -torch.exp(torch.rand(shape, generator=gen) * (5 if mild else 9) - 6)
    return [r, k, v, w, torch.randn(H, N, generator=gen)]


def _call(version: int, xs: list[torch.Tensor], backend: str) -> torch.Tensor:
    if version == 4:
        y, (aa, bb, pp) = wkv4(*xs, backend=backend)
        return y.sum() + aa.sum() + bb.sum()
    if version == 7:
        y, s = wkv7(*xs, backend=backend)
        return y.sum() + s.sum()
    y, s = {5: wkv5, 6: wkv6}[version](*xs, backend=backend)
    return y.sum() + s.sum()


def bench_case(
    version: int, dtype: torch.dtype, T: int, repeat: int, naive_backward: bool, mild: bool = False
) -> list:
    """[(case, naive ms, chunked ms, native ms)]: forward, and forward+backward for fp32 inputs."""
    xs = _inputs(version, T, dtype, torch.Generator().manual_seed(version), mild)
    decay = {4: "", 7: " model-w"}.get(version, " mild-w" if mild else " strong-w")
    name = f"wkv{version}{decay} {str(dtype).removeprefix('torch.')}"
    with torch.no_grad():
        fwd = [best_ms(lambda b=b: _call(version, xs, b), repeat) for b in ("naive", "chunked")]
        nat = (
            best_ms(lambda: _call(version, xs, "native"), repeat)
            if (wkv7_native.available() if version == 7 else version != 4 and native.available())
            else None
        )
    rows = [(f"{name} forward", *fwd, nat)]
    if dtype == torch.float32:
        leaves = [x.detach().clone().requires_grad_() for x in xs]
        step = lambda b: _call(version, leaves, b).backward()
        nb = best_ms(lambda: step("naive"), 1) if naive_backward else float("nan")
        rows.append((f"{name} forward+backward", nb, best_ms(lambda: step("chunked"), repeat), None))
    return rows


def run(
    T: int, repeat: int, naive_backward: bool, versions: tuple[int, ...] = (7, 6, 5, 4)
) -> list[tuple[str, float, float, float | None]]:
    rows = []
    for version, mild in ((7, False), (6, True), (6, False), (5, True), (5, False), (4, False)):
        if version not in versions:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            rows += bench_case(version, dtype, T, repeat, naive_backward, mild)
    return rows


VERSIONS = ("7", "6", "5", "4")  # what --versions takes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="rwkvkit bench ops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--T", type=positive_int, default=512, help="tokens per call")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--repeat", type=positive_int, default=5, help="timed calls per measurement (best is kept)"
    )
    p.add_argument("--no-naive-backward", action="store_true", help="skip the slow naive backward")
    p.add_argument(
        "--versions",
        type=csv_choices(VERSIONS),
        default="7,6,5,4",
        help="comma-separated WKV versions to time",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"WKV ops, B=1 H=12 N=64 (C=768), T={args.T}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"{'case':<40} {'naive ms':>10} {'chunked ms':>11} {'speedup':>8} {'native ms':>10} {'speedup':>8}")
    for name, naive, chunked, nat in run(
        args.T, args.repeat, not args.no_naive_backward, tuple(int(x) for x in args.versions)
    ):
        tail = f" {nat:>10.2f} {naive / nat:>7.1f}x" if nat else ""
        print(f"{name:<40} {naive:>10.2f} {chunked:>11.2f} {naive / chunked:>7.1f}x{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
