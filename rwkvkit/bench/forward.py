"""``rwkvkit bench forward``: prefill and decode speed against the reference, with the machine's limits.

One run, one random model per ``--version`` (Finch by default; ``--version 7`` Goose, ``--version 6,7``
both against the same machine limits) of the 0.1B shape (L12, D768, V65536, bf16 file like the
released ones):

- prefill tokens/s on a 512-token prompt and batch-1 decode tokens/s, for the `rwkv` package
  (strategies 'cpu fp32' and 'cpu bf16', when installed; run as it ships, TorchScript JIT on, and with
  the JIT off, each in its own process: ``rwkvkit.bench.reference``) and for rwkvkit in fp32, bf16,
  fp16, int8; the ratios to the reference are taken against its fastest row;
- the limits measured in the same run: matmul FLOP/s per dtype (prefill limit = FLOP/s over the
  FLOPs per token, of the products the prompt runs: fp16 prompts run as fp32 products of the widened
  weights, PyTorch's fp16 GEMM being a scalar loop on CPUs, int8 as bf16 ones; measured again after
  every timed prefill, and every row held to the run's best) and
  memory bandwidth, the higher of a streaming read of the model's weight bytes and the best
  matrix-vector kernel's (decode limit = bandwidth over weight bytes per token);
- the quality cost of every reduced-precision path against fp32 (max and mean |logit error| and top-1
  agreement over the prompt, and over the same tokens decoded one per call), including a simulation
  of ggml's Q8_0 (rwkv.cpp) on the same model;
- bf16 and int8 native decode steps at several batch sizes, with the floors the machine sets
  (``rwkvkit.bench.batch``: read bandwidth and instruction peaks measured by a probe); ``--only-batched``
  prints that section alone.
Machines here are shared and noisy: read the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from ..cli_args import csv_list, non_negative_int, positive_int
from ..testing import random_checkpoint
from .limits import (
    _best,
    _q8_0_activations,
    matmul_flops,
    matvec_bandwidth,
    quality,
    simulate_q8_0,
    stream_bandwidth,
    weight_bytes_per_token,
)


def _versions(value: str) -> list[int]:
    from ..models import registry

    try:
        out = [int(v) for v in csv_list(value)]
        for v in out:
            registry.get(v)  # ValueError naming the supported versions
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{e}; rwkvkit supports {registry.supported()}" if "supports" not in str(e) else str(e)
        ) from None
    return out


def _batches(value: str) -> list[int]:
    """``--batches``: comma-separated positive batch sizes ('' for none)."""
    return [positive_int(v) for v in csv_list(value)] if value.strip() else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rwkvkit bench forward", description=__doc__.split("\n")[0])
    p.add_argument(
        "--version",
        type=_versions,
        default=[6],
        help="RWKV version(s) of the random model, comma-separated (6: Finch, 7: Goose; '6,7': both in one run)",
    )
    p.add_argument("--layers", type=positive_int, default=12)
    p.add_argument("--embd", type=positive_int, default=768)
    p.add_argument("--vocab", type=positive_int, default=65536)
    p.add_argument("--prompt", type=positive_int, default=512, help="prefill length")
    p.add_argument("--decode", type=positive_int, default=32, help="tokens to decode per measurement")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: leave as is)")
    p.add_argument(
        "--repeat", type=positive_int, default=5, help="timed runs per figure, best kept (same for every row)"
    )
    p.add_argument("--no-reference", action="store_true", help="skip the rwkv package")
    p.add_argument("--only-batched", action="store_true", help="only the batched decode-step section")
    p.add_argument(
        "--batches",
        type=_batches,
        default=[1, 4, 16],
        help="batch sizes for the batched decode-step rows (comma-separated; empty to skip)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    if args.only_batched:  # the batched decode-step section alone, on the Finch model
        tmp = tempfile.mkdtemp(prefix="rwkvkit-bench-")
        path = os.path.join(tmp, "RWKV-x060-random-0B1.pth")
        random_checkpoint(
            6, args.layers, args.embd, args.vocab, head_size=64, dtype=torch.bfloat16, seed=0, path=path
        )
        print(f"Finch L{args.layers} D{args.embd} V{args.vocab}")
        for line in _batched(path, args):
            print(line)
        return 0

    # ---- machine limits (measured once, shared by every version's rows) ------------------------
    flops = {k: matmul_flops(dt) for k, dt in [("fp32", torch.float32), ("bf16", torch.bfloat16)]}
    flops["fp16"] = matmul_flops(torch.float16)
    bw = {k: matvec_bandwidth(k) for k in ("fp32", "bf16", "fp16", "int8")}
    print("machine: matmul " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in flops.items()))
    print("machine: batch-1 matvec " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw.items()))
    for version in args.version:
        _bench_version(version, args, flops, bw)
    return 0


def _bench_version(version: int, args: argparse.Namespace, flops: dict, bw: dict) -> None:
    """Every row of one version's random model of the chosen shape (see the module docstring)."""
    import rwkvkit

    from ..models import registry
    from ..models.spec import Version

    spec = registry.get(version)
    tmp = tempfile.mkdtemp(prefix="rwkvkit-bench-")
    path = os.path.join(tmp, f"RWKV-x0{version}0-random-0B1.pth")
    random_checkpoint(
        version, args.layers, args.embd, args.vocab, head_size=64, dtype=torch.bfloat16, seed=0, path=path
    )
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist()
    print(f"\n==== {spec.name} L{args.layers} D{args.embd} V{args.vocab} ====")
    probe = rwkvkit.load(path, dtype=torch.bfloat16)
    stream = {k: stream_bandwidth(weight_bytes_per_token(probe) * (2 if k == "fp32" else 1)) for k in bw}
    del probe
    print(
        "machine: streaming read of the weight bytes "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in stream.items())
        + " (decode limits: the higher of this and the matvec figure)"
    )
    bw = {k: max(bw[k], stream[k]) for k in bw}

    rows: list[
        tuple[str, float, float, float, float, str]
    ] = []  # name, prefill, pre-limit, decode, dec-limit, q

    # ---- reference: as it ships (TorchScript JIT on) and with the JIT off, each in its own process --
    ref_logits = None
    ref_best = {"prefill": 0.0, "decode": 0.0}
    ref_best_row = {"prefill": "", "decode": ""}
    if not args.no_reference:
        from . import reference

        for jit in (True, False):
            got, logits = reference.measure(path, prompt, args.decode, args.repeat, jit, version)
            if not got:
                print("\nreference: the rwkv package is not installed (pip install rwkv==0.8.32)")
                break
            if (
                ref_logits is None or not jit
            ):  # the quality column's reference: the JIT-off run (as the tests)
                ref_logits = logits
            for strat, pre, de in got:
                name = f"rwkv '{strat}' JIT {'on' if jit else 'off'}"
                for key, value in (("prefill", pre), ("decode", de)):
                    if value > ref_best[key]:
                        ref_best[key], ref_best_row[key] = value, name
                rows.append((name, pre, 0, de, 0, ""))

    # ---- rwkvkit --------------------------------------------------------------------------------
    fp32_logits = None
    decode_quality: dict[str, str] = {}
    limit_of: dict[str, tuple[str, float]] = {}  # row -> (limit dtype, FLOPs per token)
    paired: dict[str, float] = {}  # row -> median over (prefill, limit measured right after) pairs
    # (row, load arguments, decode bandwidth key, prefill matmul key: the products a prompt runs, fp16
    # ones as fp32 products of the widened weights, int8 ones as bf16 products of the dequantised matrix)
    variants = [
        ("fp32", dict(dtype=torch.float32), "fp32", "fp32"),
        ("bf16", dict(dtype=torch.bfloat16), "bf16", "bf16"),
        ("fp16", dict(dtype=torch.float16), "fp16", "fp32"),
        ("int8", dict(quantize="int8", dtype=torch.bfloat16), "int8", "bf16"),  # bf16: LoRAs, embedding
    ]
    for name, kw, lim, key in variants:
        model = rwkvkit.load(path, **kw)
        cfg = model.config
        with torch.no_grad():
            # each timed prefill is followed by a measurement of the matmul limit, so that the two see
            # the same load on a shared machine; the limit kept is the best of every measurement
            # (the pairs also give a ratio less at the mercy of a noisy host: the median over the pairs of
            # the limit measured right after a prefill over that prefill's speed)
            t_pre = float("inf")
            model(prompt, last_only=True)
            mdt = torch.float32 if key == "fp32" else torch.bfloat16
            pair_ratios = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                model(prompt, last_only=True)
                t = time.perf_counter() - t0
                t_pre = min(t_pre, t)
                f = matmul_flops(mdt, rounds=1)
                flops[key] = max(flops[key], f)
                pair_ratios.append(f * t / args.prompt)  # / FLOPs per token, below
            _, st = model(prompt, last_only=True)

            def dec(model=model, st=st):
                s = st
                for t in prompt[: args.decode]:
                    _, s = model([t], s)

            t_dec = _best(dec, args.repeat) / args.decode
            logits = model(prompt[:64])[0][0]  # the prompt path
            s, steps = None, []
            for t in prompt[:64]:  # the decode path (one token per call)
                out, s = model([t], s)
                steps.append(out[0, 0])
            steps = torch.stack(steps)
        if fp32_logits is None:
            fp32_logits = logits
            q = "reference (max diff to rwkv fp32: "
            q += f"{(logits - ref_logits).abs().max().item():.1e})" if ref_logits is not None else "n/a)"
            q += f"; decode path {(steps - logits).abs().max().item():.1e}"
        else:
            q = quality(fp32_logits, logits)
            decode_quality[name] = quality(fp32_logits, steps)
        # FLOPs per prefill token: 2 per weight of every block matrix (the head runs once per prompt)
        block_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks."))
        block_params += sum(
            b.numel() for n, b in model.named_buffers() if n.startswith("blocks.") and "int8" in n
        )
        flop_tok = 2 * block_params + 4 * cfg.n_embd * cfg.head_size  # + WKV state products
        pre_limit = flops[key] / flop_tok
        limit_of[f"rwkvkit {name}"] = (key, flop_tok)
        paired[f"rwkvkit {name}"] = statistics.median(pair_ratios) / flop_tok
        dec_limit = bw[lim] / weight_bytes_per_token(model)
        rows.append((f"rwkvkit {name}", args.prompt / t_pre, pre_limit, 1 / t_dec, dec_limit, q))
        del model

    # the batched section measures _decode_cpu's several-row step: versions that use that step
    shared_step = type(spec).native_step is Version.native_step
    batch_lines = _batched(path, args) if args.batches and shared_step else []

    # ---- Q8_0 simulation (quality only) ---------------------------------------------------------
    # rwkv.cpp's Q8_0 path: Q8_0 weights times activations that ggml also quantises to Q8_0 (blocks
    # of 32) before the dot products; fp16 head (activations rounded to fp16)
    model = rwkvkit.load(path)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                m.weight.data = w.half().float() if m is model.head else simulate_q8_0(w)
        q8w = model(prompt[:64])[0][0]
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                act = (lambda x: x.half().float()) if m is model.head else _q8_0_activations
                m.register_forward_pre_hook(lambda mod, args, act=act: (act(args[0].float()),))
        q8 = model(prompt[:64])[0][0]
    q8w_quality, q8_quality = quality(fp32_logits, q8w), quality(fp32_logits, q8)

    # the prefill limits from the best matmul figure of the whole run (measured again after every
    # timed prefill), so that every row is held to the same, highest, limit
    rows = [
        (n, pre, flops[limit_of[n][0]] / limit_of[n][1] if n in limit_of else pl, de, dl, q)
        for n, pre, pl, de, dl, q in rows
    ]
    print(
        "machine: matmul, best of the run "
        + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in flops.items())
    )
    print(
        f"\n{'':24} {'prefill tok/s':>14} {'(limit)':>9} {'decode tok/s':>13} {'(limit)':>8}  quality vs fp32 logits"
    )
    for name, pre, pl, de, dl, q in rows:
        pl_s = f"({pl:.0f})" if pl else ""
        dl_s = f"({dl:.0f})" if dl else ""
        print(f"{name:24} {pre:14.0f} {pl_s:>9} {de:13.1f} {dl_s:>8}  {q}")
    print(
        f"{'ggml Q8_0 (simulated)':24} {'':14} {'':>9} {'':>13} {'':>8}  {q8_quality}  (as rwkv.cpp: q8_0 x q8_0)"
    )
    print(f"{'  Q8_0 weights only':24} {'':14} {'':>9} {'':>13} {'':>8}  {q8w_quality}  (fp32 activations)")
    if batch_lines:
        print()
        for line in batch_lines:
            print(line)
    print("\nquality of the decode path (64 tokens, one per call) vs fp32 logits:")
    for name, q in decode_quality.items():
        print(f"{'rwkvkit ' + name:24} {q}")
    if ref_best["prefill"]:
        kit = {name: (pre, de) for name, pre, _, de, _, _ in rows if name.startswith("rwkvkit")}
        bf16_pre = kit["rwkvkit bf16"][0]
        print(
            f"\nprefill: rwkvkit bf16 {bf16_pre:.0f} tok/s = {bf16_pre / ref_best['prefill']:.2f}x the reference's "
            f"best ({ref_best['prefill']:.0f}, {ref_best_row['prefill']}); target >= 4x"
        )
        best_dec = max(kit, key=lambda n: kit[n][1])
        print(
            f"decode:  {best_dec} {kit[best_dec][1]:.1f} tok/s = {kit[best_dec][1] / ref_best['decode']:.2f}x the "
            f"reference's best ({ref_best['decode']:.1f}, {ref_best_row['decode']}); target >= 2.2x"
        )
    dec = {name: (de, dl) for name, _, _, de, dl, _ in rows if name.startswith("rwkvkit")}
    for name, (de, dl) in dec.items():
        print(
            f"decode:  {name} {de:.1f} tok/s is {dl / de:.2f}x below its bandwidth limit ({dl:.1f}); target within 2x"
        )
    limits = {name: (pre, pl) for name, pre, pl, _, _, _ in rows if name.startswith("rwkvkit")}
    pre, pl = limits["rwkvkit bf16"]
    print(
        f"prefill: rwkvkit bf16 {pre:.0f} tok/s is {pl / pre:.2f}x below its matmul limit ({pl:.0f}, from the best "
        f"matmul figure of the run; median over {args.repeat} pairs of a prefill and the limit measured right "
        f"after it: {paired['rwkvkit bf16']:.2f}x); target within 2x"
    )


def _batched(path: str, args: argparse.Namespace) -> list[str]:
    """The batched decode-step section (``rwkvkit.bench.batch``): bf16 and int8 models, ``--batches``."""
    import rwkvkit

    from ..ops import decode as native
    from . import batch

    if not native.available():
        return ["batched decode steps: the native step is not built"]
    batches = sorted({1, *args.batches})
    models = {
        "bf16": rwkvkit.load(path, dtype=torch.bfloat16),
        "int8": rwkvkit.load(path, quantize="int8", dtype=torch.bfloat16),
    }
    limits = batch.machine_limits(torch.get_num_threads(), args.repeat)
    rows = batch.time_steps(models, batches, args.repeat)
    lines = batch.report(models, rows, limits)
    B = batches[-1]
    for name, model in models.items():  # what the bf16 activations cost: the same rows, float32 activations
        got, want = (batch.step_logits(model, B, 8, act) for act in (True, False))
        lines.append(f"  {name} B={B}, 8 steps, bf16 vs float32 activations: {quality(want, got)}")
    lines.append(
        "decode loop (BatchDecoder.step: the step, per-row sampling, bookkeeping; no HTTP), rows x tok/s:"
    )
    for name, model in models.items():
        for temperature, how in ((1.0, "top-p 0.85"), (0.0, "greedy")):
            t = {B: batch.time_decoder(model, B, 8, temperature, args.repeat) for B in batches}
            lines.append(
                f"  {name:6} {how:10} "
                + "  ".join(f"B={B}: {t[B] * 1e3:.1f} ms {B / t[B]:.0f} tok/s" for B in batches)
                + f"  (B={batches[-1]} vs 1: {t[1] / t[batches[-1]] * batches[-1]:.2f}x)"
            )
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
