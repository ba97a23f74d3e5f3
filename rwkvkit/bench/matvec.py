"""One-row matrix-vector speed of the native step's kernels: GB/s of weights read, per kind and shape.

    rwkvkit bench matvec [--threads 2] [--rounds 6] [--kinds fp32,bf16,fp16,int8] [--shapes 65536x768,...]

Decode of one token reads every weight once, so these kernels should read at the machine's streaming
rate. For each matrix kind the two one-row paths run side by side in one process, alternating round by
round (best round kept): ``widen`` (weights widened to fp32, the path of CPUs without AVX512_BF16 /
AVX512_VNNI) and ``dot`` (``_decode_rows1.c``: VDPBF16PS on x split into two bf16 parts, VPDPBUSD on x as
two 8-bit digits; fp16 has one kernel, fp32 the widening one). Each call reads a different copy of the
matrix (300 MB of copies), so the weights come from memory, as in a step. The last line is the
streaming read of a 300 MB buffer on the same threads. Shared machines are noisy: read the ratios of
one run.
"""

from __future__ import annotations

import argparse
import time

import torch

from .. import kernels
from ..models.quant import Int8Linear
from ..ops import decode

_KINDS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
_POOL = 300e6  # bytes of copies per case: well past the L3 cache


def _case(kind: str, W: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor | None]], int]:
    if kind == "int8":
        lin = Int8Linear(W)
        w, s = lin.weight_int8, lin.scale
        nbytes = w.numel() + 2 * s.numel()
    else:
        w, s = W.to(_KINDS[kind]).contiguous(), None
        nbytes = w.numel() * w.element_size()
    copies = max(1, int(_POOL // nbytes))
    return [(w.clone(), None if s is None else s.clone()) for _ in range(copies)], nbytes


def _time(pool: list, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    for w, s in pool:
        if s is None:
            decode.dense_matmul(x, w)
        else:
            decode.q8_matmul(x, w, s)
    return (time.perf_counter() - t0) / len(pool)


def run(kinds: list[str], shapes: list[tuple[int, int]], rounds: int) -> None:
    ext = decode._decode_cpu
    modes = {"widen": False, "dot": True}
    print(
        f"threads {torch.get_num_threads()}, dot kernels here: bf16 {bool(ext.dot_bf16)}, int8 {bool(ext.dot_vnni)}"
    )
    print(f"{'matrix':>12} {'kind':>5} {'widen GB/s':>11} {'dot GB/s':>9} {'dot/widen':>9}")
    g = torch.Generator().manual_seed(0)
    try:
        for N, K in shapes:
            W = torch.randn(N, K, generator=g) / 20
            x = torch.randn(1, K, generator=g)
            for kind in kinds:
                pool, nbytes = _case(kind, W)
                best = dict.fromkeys(modes, float("inf"))
                for _ in range(rounds):
                    for mode, rowdot in modes.items():
                        decode.configure(kernels.PORTABLE, rowdot=rowdot)
                        best[mode] = min(best[mode], _time(pool, x))
                gbs = {m: nbytes / t / 1e9 for m, t in best.items()}
                print(
                    f"{f'{N}x{K}':>12} {kind:>5} {gbs['widen']:11.1f} {gbs['dot']:9.1f} "
                    f"{gbs['dot'] / gbs['widen']:8.2f}x",
                    flush=True,
                )
                del pool
    finally:
        decode.configure(kernels.PORTABLE)
    buf = torch.ones(int(_POOL), dtype=torch.uint8)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        ext.probe(kind=3, iters=0, buf=buf.data_ptr(), bytes=buf.numel(), threads=torch.get_num_threads())
        best = min(best, time.perf_counter() - t0)
    print(f"{'streaming read':>18} {buf.numel() / best / 1e9:11.1f} GB/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rwkvkit bench matvec", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: leave as is)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds per case, best kept")
    ap.add_argument("--kinds", default="fp32,bf16,fp16,int8")
    ap.add_argument("--shapes", default="65536x768,3072x768,768x3072,768x768", help="NxK (rows x inputs)")
    args = ap.parse_args(argv)
    if not decode.available():
        print("the native decode kernels are not built")
        return 1
    kinds = args.kinds.split(",")
    bad = [k for k in kinds if k not in _KINDS]
    if bad:
        ap.error(f"unknown kinds {bad}: choose from {list(_KINDS)}")
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        ap.error(f"--shapes takes NxK pairs like 768x3072, got {args.shapes!r}")
    if any(len(s) != 2 or s[1] % 32 for s in shapes):
        ap.error("--shapes: NxK with K a multiple of 32")
    if args.threads:
        torch.set_num_threads(args.threads)
    run(kinds, shapes, args.rounds)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
