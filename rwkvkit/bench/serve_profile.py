"""Where a decode step's time goes: the decoder's own timings (``BatchDecoder.timings``, which the
server reports in ``/health``) turned into milliseconds per step, for the server under its clients and
for the same rows decoded in this process without HTTP (``rwkvkit bench serve --measure profile``).

A step of B rows is: sampling (copy the [B, V] logits, draw every row's token), logprobs (none here),
the per-row loop (bookkeeping and each row's ``on_token`` hook, which in the server decodes text and
hands it to the HTTP thread), the [B, 1] model forward, and prompt slices. The server's step time
minus the in-process one is what serving over HTTP costs the decode loop: the event loop's JSON and
socket writes run in another thread of the same process and compete for the cores and the GIL.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

PARTS = (("model_s", "model"), ("sample_s", "sampling"), ("score_s", "logprobs"), ("emit_s", "per-row loop"),
         ("prefill_s", "prompts"))  # fmt: skip


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process ``pid`` has used, from Linux /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_step(before: dict, after: dict, wall_s: float | None = None, cpu_s: float | None = None) -> dict:
    """Milliseconds per decode step of each part, from two snapshots of the timings; ``wall_s`` and
    ``cpu_s``: the wall time and the process's CPU time between them."""
    d = {k: after[k] - before[k] for k in after}
    steps = max(d["steps"], 1)
    out = {"steps": d["steps"], "rows_per_step": d["rows"] / steps, "step_ms": d["step_s"] * 1e3 / steps}
    out.update({k: d[k] * 1e3 / steps for k, _ in PARTS})
    if wall_s is not None:
        out["wall_ms"] = wall_s * 1e3 / steps
    if cpu_s is not None:
        out["cpu_ms"] = cpu_s * 1e3 / steps
    return out


def describe(label: str, p: dict) -> str:
    parts = ", ".join(f"{name} {p[k]:.1f}" for k, name in PARTS if p[k] >= 0.05)
    other = p["step_ms"] - sum(p[k] for k, _ in PARTS)
    text = f"{label}: {p['rows_per_step']:.1f} rows/step, {p['step_ms']:.1f} ms per step = {parts}, other {other:.1f}"
    if "wall_ms" in p:
        text += f"; wall {p['wall_ms']:.1f} ms per step"
    if "cpu_ms" in p:
        text += f", process CPU {p['cpu_ms']:.1f} ms per step"
    return text


def profile_decoder(
    path: Path, args: argparse.Namespace, rows: int, steps: int = 48, cpu: bool = False
) -> dict:
    """Decode ``rows`` rows (the throughput clients' prompts and sampling) for ``steps`` steps in this
    process, each row with a text hook like the server's; returns ``per_step`` of the timings (of CPU
    time, ``time.process_time``, with ``cpu``: on a shared machine it does not count the time other
    processes take from this one; with one torch thread it is the work done)."""
    import torch

    import rwkvkit
    from rwkvkit.decoder import TIMINGS, BatchDecoder, Row
    from rwkvkit.dtypes import DTYPES
    from rwkvkit.generation import TextStream, penalty_weights
    from rwkvkit.sampling import Sampler, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    model = rwkvkit.load(path, dtype=dtype, quantize=args.quantize)
    tok = rwkvkit.Tokenizer()
    weights = penalty_weights(tok, 65536)
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, presence_penalty=0, frequency_penalty=0
    )
    dec = BatchDecoder(model, interleave=32)
    if cpu:
        dec.clock = time.process_time
    for i in range(rows):
        text = TextStream(tok, [])
        hook = lambda t, text=text: (text.feed(t), text.stopped)[1]  # noqa: E731
        prompt = tok.encode(f"Client {i} says: hello, " + "and " * (i % 7))
        dec.add(Row(prompt=prompt, sampler=Sampler(params, 65536, weights), max_tokens=10**6, on_token=hook))
    with torch.no_grad():
        while dec.prefilling or len(dec.rows) < rows:
            dec.step()
        for _ in range(4):
            dec.step()
        before = dict(dec.timings)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            dec.step()
        wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    return per_step(before, {k: dec.timings[k] for k in TIMINGS}, wall, cpu_s)


def profile_in_process(path: Path, args: argparse.Namespace) -> dict[int, dict]:
    """``profile_decoder`` (CPU time) at the fewest and the most clients of ``args.levels``, printed
    with what serving over HTTP adds (``args.profiles``: the server's, from ``run_level``) and with
    the most rows' step against the fewest's: the batched step's cost per row on this core."""
    out = {}
    for rows in sorted({min(args.levels), max(args.levels)}):
        p = out[rows] = profile_decoder(path, args, rows, cpu=True)
        print("  " + describe(f"in process (no HTTP), {rows} rows, CPU ms", p), flush=True)
        if rows in args.profiles:
            http = args.profiles[rows]["cpu_ms"] - p["cpu_ms"]
            print(f"  serving {rows} clients over HTTP: the server process used {args.profiles[rows]['cpu_ms']:.1f} ms "
                  f"of CPU per step, {http:+.1f} ms ({http / max(p['cpu_ms'], 1e-9) * 100:+.0f}%) against the "
                  "in-process step")  # fmt: skip
    lo, hi = min(out), max(out)
    if hi > lo:
        a, b = out[lo], out[hi]
        print(f"  in process, {hi} rows vs {lo}: a step costs {b['cpu_ms'] / a['cpu_ms']:.1f}x the CPU (model "
              f"{b['model_s'] / a['model_s']:.1f}x, sampling {b['sample_s'] / max(a['sample_s'], 1e-9):.1f}x), so "
              f"{hi} rows decode at most {hi / lo * a['cpu_ms'] / b['cpu_ms']:.1f}x the tokens/s of {lo} "
              "on the same core")  # fmt: skip
    return out
