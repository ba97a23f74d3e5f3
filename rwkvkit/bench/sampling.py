"""Batched sampling speed: the tensor path (NumPy-sorted top-p cutoffs) vs the C kernel, side by side.

    rwkvkit bench sampling [--vocab 65536] [--rows 1,16] [--threads 1,2] [--repeat 30]

``draw_rows`` of the server's decode step with the reference defaults (temperature 1, top_p 0.85, the
penalties), on a random model's flat rows (logits randn * 2: a nucleus of ~11k of 65536 tokens) and
a trained model's peaked ones (randn * 6: a few tokens), plus its parts: ``torch.softmax`` and the
top-p cutoffs alone (NumPy's ``top_p_cutoffs`` vs the C one). The two paths are timed alternately,
call by call, and the best of ``repeat`` calls is printed: shared machines are noisy, read the ratios.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ..ops import sample_native
from ..sampling import Sampler, SamplingParams, draw_rows, top_p_cutoffs


def best_of_pair(a: Callable[[], object], b: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Best wall time (ms) of ``a`` and of ``b``, called alternately ``repeat`` times each."""
    a(), b()
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0] * 1e3, best[1] * 1e3


def _tensor_path(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        saved, sample_native._sample_cpu = sample_native._sample_cpu, None
        try:
            return fn()
        finally:
            sample_native._sample_cpu = saved

    return run


def _line(kind: str, scale: float, b: int, V: int, repeat: int) -> str:
    x = torch.randn(b, V, generator=torch.Generator().manual_seed(b)) * scale
    probs = torch.softmax(x, 1)
    samplers = [Sampler(SamplingParams(seed=i), V) for i in range(b)]
    nucleus = int((probs[0] >= sample_native.top_p_cutoffs(probs[:1], 0.85)[0]).sum())
    c_np, c_c = best_of_pair(
        lambda: top_p_cutoffs(probs.numpy(), 0.85), lambda: sample_native.top_p_cutoffs(probs, 0.85), repeat
    )
    soft, _ = best_of_pair(lambda: torch.softmax(x, 1), lambda: None, repeat)
    old, new = best_of_pair(
        _tensor_path(lambda: draw_rows(x, samplers)), lambda: draw_rows(x, samplers), repeat
    )
    return (
        f"{kind:15s} rows {b:3d} (nucleus {nucleus:5d}): softmax {soft:6.2f} | cutoffs NumPy {c_np:6.2f} "
        f"C {c_c:6.2f} | draw_rows tensor path {old:6.2f} C {new:6.2f} ({old / new:4.1f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rwkvkit bench sampling", description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--rows", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--repeat", type=int, default=30, help="timed calls of each path, best kept")
    args = p.parse_args(argv)
    if not sample_native.available():
        print("the C sampler is not built (rwkvkit.ops._sample_cpu): nothing to compare")
        return 1
    n0 = torch.get_num_threads()
    print(f"draw_rows, V={args.vocab}, temperature 1, top_p 0.85, penalties on; best of {args.repeat}, ms")
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for kind, scale in (("flat randn*2", 2.0), ("peaked randn*6", 6.0)):
                for b in (int(r) for r in args.rows.split(",")):
                    print(f"threads {threads} " + _line(kind, scale, b, args.vocab, args.repeat))
    finally:
        torch.set_num_threads(n0)
    return 0
