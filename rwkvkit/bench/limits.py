"""The machine's limits and the quality measures behind ``rwkvkit bench forward``: best-of timing
(``_best``), matmul FLOP/s per dtype, matrix-vector and streaming read bandwidth, the weight bytes a
decoded token reads, ggml's Q8_0 simulated on a model's weights and activations, and the logit error
and top-1 agreement of a reduced-precision path against fp32.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..dtypes import dtype_from_name


def _best(fn: Callable[[], object], repeat: int, min_time: float = 0.0) -> float:
    """Best wall time of ``repeat`` calls (after one warm-up)."""
    fn()
    best = float("inf")
    t_end = time.perf_counter() + min_time
    for i in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() > t_end:
            break
    return best


def matmul_flops(dtype: torch.dtype, m: int = 512, n: int = 768, k: int = 768, rounds: int = 5) -> float:
    """FLOP/s of an [m, k] x [k, n] product with the fastest kernel on hand: PyTorch's ``a @ b`` or,
    in bf16, the AMX kernel the models use for prompts (``rwkvkit.ops.matmul``); the best of
    ``rounds`` timings of 10 products each (the matrices stay in cache: a best case)."""
    from ..ops import matmul

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    fns = [lambda: [a @ b for _ in range(10)]]
    w = b.t().contiguous()  # the kernel's weight layout: [n, k], as nn.Linear stores it
    if matmul.available() and matmul.applies(a, w):
        fns.append(lambda: [matmul.linear(a, w) for _ in range(10)])
    t = min(_best(fn, rounds) for fn in fns) / 10
    return 2 * m * n * k / t


def matvec_bandwidth(kind: str, n: int = 2688, k: int = 768, layers: int = 40) -> float:
    """Bytes of weights per second for batch-1 products over many distinct matrices (not cache-resident),
    with the fastest kernel on hand: PyTorch's or the native step's (int8: the step's Q8_0 kernel)."""
    from ..ops import decode as native

    if kind == "int8":
        if not native.available():
            return float("nan")
        ws = [torch.randint(-127, 127, (n, k), dtype=torch.int8) for _ in range(layers)]
        sc = torch.rand(n, k // 32).to(torch.float16)
        x = torch.randn(1, k)
        nbytes = n * k + sc.numel() * 2
        return nbytes * layers / _best(lambda: [native.q8_matmul(x, w, sc) for w in ws], 5)
    dtype = dtype_from_name(kind)
    ws = [torch.randn(n, k).to(dtype) for _ in range(layers)]
    x = torch.randn(1, k).to(dtype)
    fns = [lambda: [torch.nn.functional.linear(x, w) for w in ws]]
    if dtype == torch.bfloat16:  # PyTorch's matrix-vector kernel reads one bf16 row faster than F.linear
        fns.append(lambda: [torch.mv(w, x[0]) for w in ws])
    if native.available() and native.matrix_kind(ws[0]) is not None:
        fns.append(lambda: [native.dense_matmul(x, w) for w in ws])
    return n * k * ws[0].element_size() * layers / min(_best(fn, 5) for fn in fns)


def simulate_q8_0(w: torch.Tensor) -> torch.Tensor:
    """ggml Q8_0: blocks of 32 along the input dimension, fp16 scale absmax/127, round to nearest."""
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // 32, 32)
    d = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.where(d > 0, torch.round(blocks / d.clamp_min(1e-30)), 0).clamp(-127, 127)
    return (q * d).reshape(out_f, in_f)


def _q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """ggml quantises activations to Q8_0 too (blocks of 32, fp16 scale) before a Q8_0 dot product."""
    shape = x.shape
    return simulate_q8_0(x.reshape(-1, shape[-1])).view(shape)


def quality(ref: torch.Tensor, got: torch.Tensor) -> str:
    err = (got - ref).abs()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return f"max {err.max().item():.2e}  mean {err.mean().item():.2e}  top-1 {agree * 100:.1f}%"


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes read per decoded token: every matrix (not the embedding: one row) plus the small vectors."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "emb.weight":
            continue
        total += t.numel() * t.element_size()
    return total


def stream_bandwidth(nbytes: int) -> float:
    """Bytes per second of a streaming read of ``nbytes`` (a sum over an fp32 buffer that size, larger
    than the caches for the models measured here): the memory's own limit for decode."""
    buf = torch.ones(max(nbytes // 4, 1 << 20))
    return buf.numel() * 4 / _best(lambda: buf.sum(), 5)
