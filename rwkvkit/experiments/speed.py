"""``rwkvkit experiment speed``: the token-mixing operators' time and memory (the paper's Figures 6-7),
and the inference view: per-token decode latency and memory per sequence against context length.

Operators, alone, on random inputs of B sequences of T tokens at width d (heads of 64):

- ``finch-chunked``: ``rwkvkit.ops.wkv6(..., backend="chunked")``, the parallel form used in training
  (forward and forward+backward);
- ``finch-native``: Finch's fastest inference path here, the C kernel (``backend="native"``, CPU,
  forward only; on a GPU rwkvkit has no faster path than the chunked form, so the row is absent);
- ``attention``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` (PyTorch picks the
  kernel: flash attention on CUDA bf16, its CPU flash kernel here);
- ``mamba``: Mamba's selective scan with d channels and state size 16, with D, z and the softplus
  delta bias as Mamba's block calls it: ``mamba-ssm``'s CUDA kernel when it imports on a GPU,
  else ``baselines.selective_scan``'s loop (named in the results).

Time is the median of up to ``repeat`` calls after a warm-up; memory is the call's own peak
(``memory.peak_bytes``: the profiler's allocation events on the CPU, ``max_memory_allocated`` on
CUDA), inputs excluded. A length stops growing for an operator once one call takes longer than
``max_call_s`` or runs out of memory.

Inference view: a Finch ``rwkvkit.models.RWKV`` and a ``baselines.Transformer`` of the same layers,
width and vocabulary decode one token at a time after a context of C tokens: Finch from its
recurrent state (the native one-token step on the CPU), the transformer with its KV cache filled to
C. Both read random state/cache contents (the cost of a step does not depend on the values). Memory
per sequence is the bytes of the state or of the filled cache.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from rwkvkit.cli_args import csv_choices, positive_int

from .baselines import Transformer, TransformerConfig, mamba_ssm_available, selective_scan
from .memory import peak_bytes
from .report import Progress, add_common_args, check_results, finish_info, run_info, write_results
from .speed_report import plot, tables

OPS = ("finch-chunked", "finch-native", "attention", "mamba")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MiB = 1 << 20


@dataclass
class Preset:
    batch: int
    d_model: int
    dtype: str
    lengths: list[int]
    repeat: int
    max_call_s: float
    decode_layers: int
    decode_vocab: int
    decode_contexts: list[int]
    decode_steps: int
    head_size: int = 64
    d_state: int = 16
    ops: list[str] = field(default_factory=lambda: list(OPS))


PRESETS_SPEED: dict[str, Preset] = {
    "toy": Preset(
        batch=1, d_model=64, dtype="fp32", lengths=[64, 128], repeat=2, max_call_s=30.0,
        decode_layers=1, decode_vocab=256, decode_contexts=[16, 64], decode_steps=2,
    ),
    "cpu": Preset(
        batch=1, d_model=768, dtype="fp32", lengths=[512, 1024, 2048, 4096, 8192, 16384], repeat=3,
        max_call_s=120.0, decode_layers=12, decode_vocab=65536,
        decode_contexts=[512, 1024, 2048, 4096, 8192, 16384], decode_steps=16,
    ),
    "gpu": Preset(  # the paper's shapes: batch 8, d 4096, head 64, bf16
        batch=8, d_model=4096, dtype="bf16",
        lengths=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536], repeat=10, max_call_s=60.0,
        decode_layers=32, decode_vocab=65536,
        decode_contexts=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536], decode_steps=32,
    ),
}  # fmt: skip


# ---- operators ----------------------------------------------------------------------------------


def make_inputs(op: str, T: int, p: Preset, device: torch.device, grad: bool, seed: int = 0) -> dict:
    """Random inputs of one operator call (``requires_grad`` on the differentiable ones when ``grad``)."""
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: no host copies
    B, d, hs, dt = p.batch, p.d_model, p.head_size, DTYPES[p.dtype]
    H = d // hs

    def rnd(*shape, dtype=dt, scale=1.0):
        x = torch.randn(*shape, generator=g, device=device)
        return x.mul_(scale).to(dtype).requires_grad_(grad)

    if op.startswith("finch"):
        # log decay -exp(x), x in [-6, -1] (RWKV-LM's init range): fp32, as the model passes it
        w = torch.rand(B, T, H, hs, generator=g, device=device).mul_(5).sub_(6).exp_().neg_()
        return {
            "r": rnd(B, T, H, hs), "k": rnd(B, T, H, hs), "v": rnd(B, T, H, hs),
            "w": w.requires_grad_(grad), "u": rnd(H, hs, dtype=torch.float32, scale=0.5),
        }  # fmt: skip
    if op == "attention":
        return {"q": rnd(B, H, T, hs), "k": rnd(B, H, T, hs), "v": rnd(B, H, T, hs)}
    N = p.d_state
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1)
    return {
        "u": rnd(B, d, T), "delta": rnd(B, d, T, scale=0.5), "A": A.to(device).requires_grad_(grad),
        "B": rnd(B, N, T), "C": rnd(B, N, T), "D": rnd(d, dtype=torch.float32),
        "z": rnd(B, d, T), "delta_bias": rnd(d, dtype=torch.float32, scale=0.1),
    }  # fmt: skip


def run_op(op: str, x: dict) -> torch.Tensor:
    """One call of the operator; returns its main output."""
    from rwkvkit.ops import wkv6

    if op == "finch-chunked":
        return wkv6(x["r"], x["k"], x["v"], x["w"], x["u"], backend="chunked")[0]
    if op == "finch-native":
        return wkv6(x["r"], x["k"], x["v"], x["w"], x["u"], backend="native")[0]
    if op == "attention":
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)
    return selective_scan(
        x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True
    )  # fmt: skip


def op_applies(op: str, device: torch.device) -> bool:
    if op == "finch-native":
        from rwkvkit.ops import native

        return device.type == "cpu" and native.available()
    return True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(op: str, x: dict, mode: str, gy: torch.Tensor | None):
    if mode == "fwd":
        with torch.no_grad():
            return run_op(op, x)
    for t in x.values():
        t.grad = None
    y = run_op(op, x)
    y.backward(gy)
    return None


def time_call(fn, device: torch.device, repeat: int, budget_s: float) -> tuple[float, int, float]:
    """(median wall seconds, calls timed, median CPU seconds) of up to ``repeat`` calls after one
    warm-up (fewer when they exceed budget_s). CPU seconds are the process's (``time.process_time``):
    on a shared CPU they are what the call costs, while wall time also counts the waits for a core."""
    _sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    first, first_cpu = time.perf_counter() - t, time.process_time() - c
    times, cpus = [], []
    while len(times) < repeat and (sum(times) + first) < budget_s:
        t, c = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    if not times:
        return first, 1, first_cpu
    return statistics.median(times), len(times), statistics.median(cpus)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def measure_op(op: str, mode: str, T: int, p: Preset, device: torch.device) -> dict:
    """Time and peak memory of one (operator, mode, T); ``{"oom": True}`` when memory runs out."""
    rec = {"op": op, "mode": mode, "T": T, "batch": p.batch, "d_model": p.d_model, "dtype": p.dtype}
    if op == "mamba":
        rec["impl"] = "mamba-ssm" if device.type == "cuda" and mamba_ssm_available() else "loop"
    try:
        x = make_inputs(op, T, p, device, grad=mode == "fwd+bwd")
        gy = None
        if mode == "fwd+bwd":
            with torch.no_grad():
                gy = torch.randn_like(run_op(op, x))
        fn = lambda: _call(op, x, mode, gy)
        sec, n, cpu = time_call(fn, device, p.repeat, p.max_call_s)
        _, peak = peak_bytes(fn, device)
        rec.update(ms=sec * 1e3, calls_timed=n, peak_mib=peak / MiB)
        if device.type == "cpu":  # on a GPU the host's CPU time says nothing about the kernel
            rec["cpu_ms"] = cpu * 1e3
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not _is_oom(e):
            raise
        rec.update(oom=True, ms=None, peak_mib=None)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def run_ops(p: Preset, device: torch.device, progress: Progress) -> list[dict]:
    records = []
    for op in p.ops:
        if not op_applies(op, device):
            progress.say(f"{op}: not available on {device}, skipped")
            continue
        for mode in ("fwd",) if op == "finch-native" else ("fwd", "fwd+bwd"):
            for T in p.lengths:
                rec = measure_op(op, mode, T, p, device)
                records.append(rec)
                progress.advance(1)
                if rec.get("oom"):
                    progress.say(f"{op} {mode} T={T}: out of memory; longer T skipped")
                    break
                cpu = f" ({rec['cpu_ms']:.1f} ms CPU)" if "cpu_ms" in rec else ""
                progress.say(f"{op} {mode} T={T}: {rec['ms']:.1f} ms{cpu}, peak {rec['peak_mib']:.1f} MiB")
                if rec.get("cpu_ms", rec["ms"]) / 1e3 > p.max_call_s:
                    progress.say(f"{op} {mode}: one call took over {p.max_call_s:.0f} s; longer T skipped")
                    break
    return records


# ---- inference: decode latency and memory per sequence ------------------------------------------


def decode_models(p: Preset, device: torch.device) -> tuple[torch.nn.Module, Transformer]:
    """A Finch and a transformer with the same layers, width, heads and vocabulary (random weights)."""
    from rwkvkit.config import ModelConfig
    from rwkvkit.models import RWKV

    torch.manual_seed(0)
    dt = DTYPES[p.dtype]
    with torch.device(device):  # built where they run (a 7B-shape model would not fit twice on the host)
        finch = RWKV(ModelConfig(6, p.decode_layers, p.d_model, p.decode_vocab, head_size=p.head_size)).to(dt)
        tf = Transformer(
            TransformerConfig(p.decode_layers, p.d_model, p.decode_vocab, head_size=p.head_size)
        ).to(dt)
    return finch.eval(), tf.eval()


def _step_ms(step, device: torch.device, n: int) -> tuple[float, float]:
    """(median wall ms, median CPU ms) of ``n`` calls of ``step`` after two warm-up calls."""
    for _ in range(2):
        step()
    _sync(device)
    times, cpus = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(times) * 1e3, statistics.median(cpus) * 1e3


def _finch_decode(finch, tok: torch.Tensor, p: Preset, device: torch.device) -> tuple[tuple, int]:
    """((wall, CPU) ms per token, state bytes) of Finch's one-token step from a random state."""
    state = finch.init_state(1)
    for t in state.tensors.values():
        t.normal_().mul_(0.1)
    holder = {"state": state}

    def step():
        _, holder["state"] = finch(tok, holder["state"])

    return _step_ms(step, device, p.decode_steps), sum(
        t.numel() * t.element_size() for t in state.tensors.values()
    )


def _transformer_decode(
    tf: Transformer, tok: torch.Tensor, ctx: int, p: Preset, device: torch.device
) -> tuple[tuple, int]:
    """((wall, CPU) ms per token, KV-cache bytes) of one token after ``ctx`` cached tokens (random keys/values)."""
    cache = tf.new_cache(1, ctx + 1)
    cache.k[:, :, :, :ctx].normal_()
    cache.v[:, :, :, :ctx].normal_()

    def step():  # every step attends over the context and itself
        cache.length = ctx
        tf(tok, cache)

    return _step_ms(step, device, p.decode_steps), cache.nbytes(ctx)


def _cpu_field(cpu_ms: float, device: torch.device) -> dict:
    return {"cpu_ms_per_token": cpu_ms} if device.type == "cpu" else {}


@torch.no_grad()
def decode_view(p: Preset, device: torch.device, progress: Progress) -> list[dict]:
    finch, tf = decode_models(p, device)
    params = {
        "finch": sum(x.numel() for x in finch.parameters()),
        "transformer": sum(x.numel() for x in tf.parameters()),
    }
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    records = []
    for ctx in p.decode_contexts:
        (ms, cpu), nbytes = _finch_decode(finch, tok, p, device)
        records.append(
            {"model": "finch", "context": ctx, "ms_per_token": ms, "state_mib": nbytes / MiB}
            | _cpu_field(cpu, device)
        )
        progress.advance(1)
        progress.say(f"decode finch after {ctx} tokens: {ms:.2f} ms/token, state {nbytes / MiB:.2f} MiB")
        try:
            (ms, cpu), nbytes = _transformer_decode(tf, tok, ctx, p, device)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not _is_oom(e):
                raise
            records.append(
                {"model": "transformer", "context": ctx, "oom": True, "ms_per_token": None, "state_mib": None}
            )
            progress.say(f"decode transformer after {ctx} tokens: out of memory; longer contexts skipped")
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records.append(
            {"model": "transformer", "context": ctx, "ms_per_token": ms, "state_mib": nbytes / MiB}
            | _cpu_field(cpu, device)
        )
        progress.advance(1)
        progress.say(
            f"decode transformer after {ctx} tokens: {ms:.2f} ms/token, KV cache {nbytes / MiB:.1f} MiB"
        )
    for r in records:
        r["params"] = params[r["model"]]
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rwkvkit experiment speed", description=__doc__.split("\n\n")[0])
    add_common_args(p, "speed")
    p.add_argument(
        "--ops", type=csv_choices(OPS), default=None, help="comma-separated subset of " + ",".join(OPS)
    )
    p.add_argument(
        "--max-T", type=positive_int, default=None, help="cap the sequence lengths and contexts (smoke tests)"
    )
    p.add_argument(
        "--max-layers", type=positive_int, default=None, help="cap the decode models' layers (smoke tests)"
    )
    p.add_argument("--no-decode", action="store_true", help="skip the inference view")
    a = p.parse_args(argv)
    argv = list(argv or [])
    name = f"speed-{a.preset}"
    try:
        check_results(a.out, name, a.overwrite)
    except ValueError as e:
        p.error(str(e))
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = a.device
    preset = replace(PRESETS_SPEED[a.preset])
    if a.ops:
        preset.ops = a.ops
    if a.max_T:
        preset.lengths = [T for T in preset.lengths if T <= a.max_T] or [min(a.max_T, preset.lengths[0])]
        preset.decode_contexts = [c for c in preset.decode_contexts if c <= a.max_T] or [a.max_T]
    if a.max_layers:
        preset.decode_layers = min(preset.decode_layers, a.max_layers)
    info = run_info("speed", argv, a.seed, a.preset, device)
    progress = Progress(
        "speed",
        total=len(preset.ops) * 2 * len(preset.lengths)
        + (0 if a.no_decode else 2 * len(preset.decode_contexts)),
        enabled=not a.quiet,
    )
    t0, c0 = time.time(), time.process_time()
    ops = run_ops(preset, device, progress)
    decode = [] if a.no_decode else decode_view(preset, device, progress)
    finish_info(info, t0, c0)
    text = tables(ops, decode)
    print(text)
    payload = {"info": info, "preset": asdict(preset), "operators": ops, "decode": decode}
    title = (
        f"B={preset.batch}, d={preset.d_model}, head {preset.head_size}, {preset.dtype}, {device}"
        f" ({info['machine']['gpu'] or info['machine']['cpu']}, {torch.get_num_threads()} threads)"
    )
    paths = write_results(a.out, name, payload, text, lambda path: plot(ops, decode, title, path))
    progress.say("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0
