"""Batched decode steps against the machine's limits (a section of ``rwkvkit bench forward``).

The native step of B rows reads every weight once for all rows and does 2 x B FLOPs per weight, so
its time has two floors: the weights' bytes (plus the rows' state, read and written anew) over the
rate one core streams memory, and the products'
FLOPs over the peak of the instruction they are built on (VDPBF16PS for bf16 activations, fp32 FMA
for float32 ones). Both are measured here with ``_decode_cpu.probe`` (16 independent accumulators
in registers; a sum over a buffer larger than the caches), not taken from a data sheet. For each model
(bf16, int8) and B, the step's ms, rows x tokens/s, the ratio to one row, and the fraction of each
floor it reaches are printed, with ``Kernels.batch_bf16`` on (bf16 activations) and off (float32).
``time_decoder`` adds what the server's engine does around the step (``rwkvkit.generation.BatchDecoder``:
per-row sampling, bookkeeping), without HTTP: rows x tokens/s of the decode loop itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..ops import decode as native

PROBES = {"fp32 FMA": (0, 32), "bf16 dot (VDPBF16PS)": (1, 64), "int8 dot (VPDPBUSD)": (2, 128)}


def _best_time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_limits(threads: int, repeat: int = 5, read_mib: int = 512) -> dict[str, float]:
    """Peak ops/s of each probe instruction (``threads`` threads, each its own 16 accumulators; nan
    where the CPU lacks it) and the read bandwidth in bytes/s over ``read_mib`` MiB (not cache-resident)."""
    ext = native._ext()
    out: dict[str, float] = {}
    iters = 1_000_000
    for name, (kind, ops) in PROBES.items():
        if ext.probe(kind=kind, iters=1, bytes=0, threads=1) < 0:
            out[name] = float("nan")
            continue
        t = _best_time(lambda kind=kind: ext.probe(kind=kind, iters=iters, bytes=0, threads=threads), repeat)
        out[name] = 16 * ops * iters * threads / t
    buf = torch.ones(read_mib << 20, dtype=torch.uint8)
    t = _best_time(
        lambda: ext.probe(kind=3, iters=0, buf=buf.data_ptr(), bytes=buf.numel(), threads=threads), repeat
    )
    out["read"] = buf.numel() / t
    return out


def matrix_weights(model: torch.nn.Module) -> tuple[int, int]:
    """(weights, bytes) of the matrices one step multiplies: every block matrix (int8 ones with their
    scales) and the head; the embedding is one row per token and left out."""
    n = nbytes = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name == "emb.weight" or t.dim() < 2 or sorted(t.shape)[-2] < 16:  # vectors, [1, 1, C] mixes
            continue
        if not name.endswith("scale"):  # int8 scales: bytes, not weights
            n += t.numel()
        nbytes += t.numel() * t.element_size()
    return n, nbytes


def state_bytes(model: torch.nn.Module, B: int) -> int:
    """Bytes of the recurrent state of B rows (float32): at 16 rows of the 0.1B shape 38 MB, which the
    step reads and writes as a new state, next to 292 MB of bf16 (150 MB of int8) weights."""
    return sum(t.numel() * t.element_size() for t in model.init_state(B).tensors.values())


@dataclass
class StepRow:
    model: str
    B: int
    bf16_act: bool
    seconds: float


def time_steps(models: dict[str, torch.nn.Module], batches: list[int], repeat: int) -> list[StepRow]:
    """Best time of one native step per (model, B, batch_bf16), measurements interleaved round by round
    so that every row sees the same load on a shared machine."""
    cases = [(name, B, act) for name in models for B in batches for act in (True, False) if B > 1 or act]
    best = {c: float("inf") for c in cases}
    with torch.no_grad():
        inputs = {}
        for name, B, act in cases:
            model = models[name]
            tok = torch.arange(B).reshape(B, 1) + 1
            inputs[name, B] = (tok, model.init_state(B))
            model.set_kernels(batch_bf16=act)(tok, inputs[name, B][1])  # warm-up (plans, buffers)
        for _ in range(repeat):
            for name, B, act in cases:
                model = models[name].set_kernels(batch_bf16=act)
                tok, st = inputs[name, B]
                t0 = time.perf_counter()
                model(tok, st)
                best[name, B, act] = min(best[name, B, act], time.perf_counter() - t0)
        for m in models.values():
            m.set_kernels(batch_bf16=True)
    return [StepRow(name, B, act, best[name, B, act]) for name, B, act in cases]


def report(models: dict[str, torch.nn.Module], rows: list[StepRow], limits: dict[str, float]) -> list[str]:
    """The section's lines: per row ms, rows x tokens/s, x one row, and the two floors."""
    dot = limits["bf16 dot (VDPBF16PS)"]
    if not dot == dot:  # no AVX512_BF16: the bf16 products run as fp32 FMAs
        dot = limits["fp32 FMA"]
    lines = [
        "batched decode steps (native step, one token per row; rows x tok/s = B / step time)",
        f"  limits: read {limits['read'] / 1e9:.1f} GB/s; "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in limits.items() if k != "read"),
        f"  {'model':6} {'B':>3} {'acts':5} {'ms':>7} {'tok/s':>7} {'xB=1':>6}   "
        f"{'read floor':>10} {'% bw':>5}   {'FLOP floor':>10} {'% peak':>6}",
    ]
    one = {r.model: r.seconds for r in rows if r.B == 1}
    for r in rows:
        weights, nbytes = matrix_weights(models[r.model])
        nbytes += 2 * state_bytes(models[r.model], r.B)  # the state is read, and written anew
        peak = dot if (r.bf16_act and r.B > 1) else limits["fp32 FMA"]
        t_read, t_flop = nbytes / limits["read"], 2 * r.B * weights / peak
        acts = "bf16" if (r.bf16_act and r.B > 1) else "fp32"
        lines.append(
            f"  {r.model:6} {r.B:3d} {acts:5} {r.seconds * 1e3:7.1f} {r.B / r.seconds:7.0f} "
            f"{one[r.model] / r.seconds * r.B:6.2f}   {t_read * 1e3:8.1f}ms {t_read / r.seconds * 100:4.0f}%   "
            f"{t_flop * 1e3:8.1f}ms {t_flop / r.seconds * 100:5.0f}%"
        )
    lines.append(
        "  floors: (weight bytes + the state read and written) / read bandwidth, and 2 x B x weights / the"
        " peak of the products' instruction (bf16 activations: VDPBF16PS, else fp32 FMA); the step's time is"
        " at least the larger"
    )
    return lines


def step_logits(model: torch.nn.Module, B: int, steps: int, bf16_act: bool) -> torch.Tensor:
    """Logits [B, steps, V] of B rows of random tokens decoded one step at a time (native step) with
    ``batch_bf16=bf16_act``; float32 activations give each row's one-row result (to 5e-5)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (B, steps), generator=g)
    model.set_kernels(batch_bf16=bf16_act)
    out, st = [], None
    with torch.no_grad():
        for t in range(steps):
            logits, st = model(tokens[:, t : t + 1], st)
            out.append(logits[:, 0])
    model.set_kernels(batch_bf16=True)
    return torch.stack(out, 1)


def time_decoder(model: torch.nn.Module, B: int, steps: int, temperature: float, repeat: int) -> float:
    """Seconds per ``BatchDecoder.step`` with B rows decoding (prompts already fed), each row with its own
    sampler (top-p 0.85 at ``temperature``, 0: greedy), as the server's engine steps them."""
    from ..generation import BatchDecoder, Row
    from ..sampling import Sampler, SamplingParams

    V = model.config.vocab_size
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeat):
            dec = BatchDecoder(model)
            params = SamplingParams(temperature=temperature, top_p=0.85, seed=0)
            for b in range(B):
                dec.add(Row(prompt=[1 + b, 2, 3], sampler=Sampler(params, V), max_tokens=steps + 2))
            dec.step()  # every row decoding, plans and buffers warm
            t0 = time.perf_counter()
            for _ in range(steps):
                dec.step()
            best = min(best, (time.perf_counter() - t0) / steps)
    return best
