#!/usr/bin/env python3
"""One-shot GPU check of rwkvkit: correctness on CUDA, training under torchrun, and speed.

Run from the repository root on a machine with an NVIDIA GPU (no internet, no ``rwkv`` package
needed; rwkvkit's optional C extensions may be absent, it then runs on PyTorch alone):

    PYTHONPATH=. python3 scripts/gpu_check.py              # the GPU run (about 3 minutes)
    PYTHONPATH=. python3 scripts/gpu_check.py --cpu-smoke  # sections 2-5, tiny, on the CPU (gloo)

Sections (each one is guarded: a failure prints the tail of its traceback and the next one runs):

1. Environment: torch / CUDA / GPU, and which of rwkvkit's native extensions imported.
2. Parity: random RWKV-4 / Eagle / Finch checkpoints (``rwkvkit.testing.random_checkpoint``) loaded
   on the CPU and on CUDA in fp32 (TF32 off); logits of a 100-token sequence run whole, token by
   token (state passed back), with backend "chunked" and backend "naive", each against the CPU's
   whole-sequence logits (must be <= 1e-4). bf16 on CUDA against CPU fp32 is informational.
3. WKV ops: ``wkv6`` / ``wkv5`` chunked vs naive on CUDA fp32 (B=2, T=300, H=4, N=64, Finch decays
   down to -1e3), outputs, final state and the gradients of every input; both also against an fp64
   naive run. Everything must be finite and within 1e-4 (relative) of fp64.
4. Training: ``python -m rwkvkit.train.cli`` on a tiny learnable token stream (Finch L2 C128, ctx 128,
   bf16, 60 steps; the loss must fall and the final checkpoint must load), then under
   ``torch.distributed.run --standalone --nproc_per_node=1`` with strategy=ddp and strategy=fsdp
   (NCCL). If ddp fails because no process group exists (rwkvkit creates one only when WORLD_SIZE > 1),
   that failure is reported and ddp runs once more with the group created first, to still exercise
   the NCCL DDP path.
5. Speed (informational): random Finch at the 0.1B and 1.5B shapes in bf16: prefill, batch-1 and
   batch-64 decode, forward+backward training tokens/s, and the peak GPU memory of each.

The report is printed and written to ``$OUT/gpu_report.txt`` (``./gpu_report.txt`` without OUT).
A watchdog ends the run (and any child process) after ``--time-limit`` seconds (230 by default).
Exit status: 0, or 1 when a correctness check (sections 2-4) failed or could not complete.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
PARITY_LIMIT = 1e-4  # max |logit difference| fp32 device vs fp32 CPU
OPS_REL_LIMIT = 1e-4  # max relative error vs fp64 (the test suite holds 1e-5 forward, 2e-5 gradients)
TRAIN_VOCAB = 64


# ---------------------------------------------------------------------------------------- sizes


@dataclass
class Sizes:
    """Every size the checks use: the GPU run's, or tiny ones for the CPU smoke run."""

    device: str
    time_limit: float
    # section 2
    par_layers: int = 3
    par_embd: int = 256
    par_vocab: int = 1000
    par_head: int = 64
    par_T: int = 100
    # section 3: B, T, H, N
    ops_shape: tuple[int, int, int, int] = (2, 300, 4, 64)
    # section 4
    tr_embd: int = 128
    tr_head: int = 64
    tr_ctx: int = 128
    tr_bsz: int = 8
    tr_steps: int = 60
    tr_dist_steps: int = 10
    tr_tokens: int = 40000
    tr_timeout: float = 120.0
    tr_dist_timeout: float = 75.0
    # section 5: (name, layers, embd, vocab, train batch)
    speed_shapes: list[tuple[str, int, int, int, int]] = field(
        default_factory=lambda: [("0.1B", 12, 768, 65536, 8), ("1.5B", 24, 2048, 65536, 4)]
    )
    sp_prompt: int = 2048
    sp_decode: int = 64
    sp_batch: int = 64
    sp_train_T: int = 1024
    sp_budget: float = 90.0


def gpu_sizes(time_limit: float) -> Sizes:
    return Sizes(device="cuda", time_limit=time_limit)


def smoke_sizes(time_limit: float) -> Sizes:
    return Sizes(
        device="cpu",
        time_limit=time_limit,
        par_layers=2,
        par_embd=64,
        par_vocab=256,
        par_head=32,
        par_T=24,
        ops_shape=(1, 40, 2, 16),
        tr_embd=64,
        tr_head=32,
        tr_ctx=32,
        tr_bsz=4,
        tr_steps=8,
        tr_dist_steps=3,
        tr_tokens=6000,
        speed_shapes=[("tiny", 2, 128, 1000, 2)],
        sp_prompt=64,
        sp_decode=8,
        sp_batch=4,
        sp_train_T=64,
        sp_budget=30.0,
    )


# --------------------------------------------------------------------------------------- report


class Report:
    """Lines printed and appended (flushed) to the report file, plus the failed checks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("w")
        self.failures: list[str] = []
        self._lock = threading.Lock()

    def line(self, text: str = "") -> None:
        with self._lock:
            print(text, flush=True)
            if not self._file.closed:  # closed once the watchdog has fired
                self._file.write(text + "\n")
                self._file.flush()

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.line(f"  {'PASS' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            self.failures.append(name)

    def close(self) -> None:
        with self._lock:
            self._file.close()


START = time.monotonic()
_CHILD: subprocess.Popen | None = None  # the child process group running now (killed by the watchdog)
_CURRENT = {"section": "", "critical": False}


def elapsed() -> float:
    return time.monotonic() - START


def fmt(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def tail(text: str, lines: int = 15) -> str:
    return "\n".join("    | " + s for s in text.rstrip().splitlines()[-lines:])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def start_watchdog(rep: Report, limit: float) -> threading.Timer:
    """After ``limit`` seconds: report, dump every thread's stack, kill the child, exit."""

    def fire() -> None:
        rep.line(f"WATCHDOG: {limit:.0f} s passed during section {_CURRENT['section']!r}; aborting")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if _CHILD is not None and _CHILD.poll() is None:
            kill_group(_CHILD)
        failed = bool(rep.failures) or bool(_CURRENT["critical"])
        rep.line(f"RESULT: {'FAIL' if failed else 'OK'} (incomplete; failures: {rep.failures})")
        rep.close()
        os._exit(1 if failed else 0)

    timer = threading.Timer(limit, fire)
    timer.daemon = True
    timer.start()
    return timer


def run_section(rep: Report, title: str, fn: Callable[[], None], critical: bool) -> None:
    """Run one section; an exception is reported (and, in a correctness section, counts as a failure)."""
    _CURRENT.update(section=title, critical=critical)
    rep.line(f"== {title}")
    t0 = time.monotonic()
    try:
        fn()
    except Exception:
        rep.line("  ERROR (section aborted):\n" + tail(traceback.format_exc()))
        if critical:
            rep.failures.append(f"{title}: exception")
    finally:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as e:  # a broken CUDA context: say so, the next sections will show it
            rep.line(f"  torch.cuda.empty_cache() failed: {type(e).__name__}: {e}")
    rep.line(f"  ({time.monotonic() - t0:.1f} s; total {elapsed():.0f} s)")


# ---------------------------------------------------------------------------- 1. environment


def section_env(rep: Report, sz: Sizes) -> None:
    rep.line(f"  python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
    try:
        import triton

        rep.line(f"  triton {triton.__version__}")
    except Exception as e:
        rep.line(f"  triton: not importable ({type(e).__name__})")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rep.line(
            f"  GPU: {p.name}  cc {p.major}.{p.minor}  {p.total_memory / 2**30:.0f} GiB  "
            f"count {torch.cuda.device_count()}"
        )
    else:
        rep.line("  GPU: none (torch.cuda.is_available() is False)")
    rep.line(
        f"  fp32 matmul precision {torch.get_float32_matmul_precision()!r}  "
        f"allow_tf32 matmul={torch.backends.cuda.matmul.allow_tf32} cudnn={torch.backends.cudnn.allow_tf32}"
    )
    exts = {
        "ops._wkv_cpu": ("rwkvkit.ops.native", "available"),
        "ops._decode_cpu": ("rwkvkit.ops.decode", "available"),
        "ops._fused_cpu": ("rwkvkit.ops.fused", "available"),
        "tokenizer._native": ("rwkvkit.tokenizer.world", "native_available"),
    }
    import importlib

    parts = []
    for name, (mod, fn) in exts.items():
        try:
            parts.append(f"{name}={'yes' if getattr(importlib.import_module(mod), fn)() else 'no'}")
        except Exception as e:
            parts.append(f"{name}=? ({type(e).__name__})")
    rep.line("  rwkvkit native extensions: " + "  ".join(parts))
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        rep.line(f"  rwkvkit checkout: {rev or 'no git metadata'}")
    except Exception:
        rep.line("  rwkvkit checkout: no git")


# -------------------------------------------------------------------------------- 2. parity


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def section_parity(rep: Report, sz: Sizes, tmp: Path) -> None:
    import rwkvkit
    from rwkvkit.testing import random_checkpoint

    dev, T = sz.device, sz.par_T
    tokens = torch.randint(0, sz.par_vocab, (1, T), generator=torch.Generator().manual_seed(1))
    rep.line(
        f"  L{sz.par_layers} C{sz.par_embd} V{sz.par_vocab} head {sz.par_head}, T={T}; max |logit diff| "
        f"vs CPU fp32 whole-sequence (limit {PARITY_LIMIT:g})"
    )
    for version in (4, 5, 6):
        path = tmp / f"parity-v{version}.pth"
        random_checkpoint(
            version,
            n_layer=sz.par_layers,
            n_embd=sz.par_embd,
            vocab_size=sz.par_vocab,
            head_size=sz.par_head,
            dtype=torch.float32,
            path=path,
        )
        with torch.no_grad():
            ref, ref_state = rwkvkit.load(path)(tokens)
            model = rwkvkit.load(path, device=dev)
            x = tokens.to(dev)
            got: dict[str, torch.Tensor] = {}
            got["whole"], state = model(x)
            steps, st = [], None
            for t in range(T):
                lg, st = model(x[:, t : t + 1], st)
                steps.append(lg)
            got["step"] = torch.cat(steps, 1)
            got["chunked"] = model(x, backend="chunked")[0]
            got["naive"] = model(x, backend="naive")[0]
            del model
        diffs = {k: max_abs(v, ref) for k, v in got.items()}
        finite = all(bool(torch.isfinite(v).all()) for v in got.values())
        # final states (whole run and token by token) vs the CPU's, relative to the largest entry
        st_rel = 0.0
        for s in (state, st):
            for key, r in ref_state.tensors.items():
                if key == "pp":  # RWKV-4's running max exponent: compare as is
                    st_rel = max(st_rel, max_abs(s.tensors[key], r))
                else:
                    scale = float(r.abs().max().clamp_min(1e-30))
                    st_rel = max(st_rel, max_abs(s.tensors[key], r) / scale)
        ok = finite and max(diffs.values()) <= PARITY_LIMIT
        detail = "  ".join(f"{k} {fmt(v)}" for k, v in diffs.items())
        rep.check(
            f"v{version} fp32 {dev}",
            ok,
            f"{detail}  | state rel {fmt(st_rel)}{'' if finite else ' NONFINITE'}",
        )

        with torch.no_grad():
            lb = rwkvkit.load(path, device=dev, dtype=torch.bfloat16)(x)[0].float().cpu()
        err = (lb - ref).abs()
        top1 = float((lb.argmax(-1) == ref.argmax(-1)).float().mean())
        rep.line(
            f"  info v{version} bf16 {dev} vs CPU fp32: max {err.max():.3f}  mean {err.mean():.4f}  "
            f"top-1 agree {top1:.1%}  (logit std {ref.std():.2f})"
        )


# ------------------------------------------------------------------------------------ 3. ops


def log_decay(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    """w <= 0 as tests/test_ops_wkv.py makes it: realistic -exp(U[-6, 3]); extreme: magnitudes
    log-uniform over 1e-6..1e3 with runs of exactly -1e3 and -1e-6; mixed: RWKV-LM's init range
    -exp(U[-6, -1]) except the last head, which is extreme."""
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
    """max |a - e| / (|e| + max|e|), the test suite's measure (the max term covers cancellations)."""
    a, e = a.double(), e.double()
    scale = e.abs().max().clamp_min(1e-30)
    return float(((a - e).abs() / (e.abs() + scale)).max())


def section_ops(rep: Report, sz: Sizes) -> None:
    from rwkvkit.ops import wkv5, wkv6

    dev = sz.device
    B, T, H, N = sz.ops_shape
    names = ("y", "S", "dr", "dk", "dv", "dw", "du", "ds")
    rep.line(
        f"  B={B} T={T} H={H} N={N} on {dev}: max |chunked - naive| (fp32), then max relative error vs "
        f"fp64 naive (limit {OPS_REL_LIMIT:g})"
    )
    for seed, (op, kind) in enumerate(
        (("wkv6", "realistic"), ("wkv6", "extreme"), ("wkv6", "mixed"), ("wkv5", "extreme"))
    ):
        gen = torch.Generator().manual_seed(100 + seed)
        r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
        w = log_decay((B, T, H, N) if op == "wkv6" else (H, N), kind, gen)
        u = torch.randn(H, N, generator=gen)
        s = torch.randn(B, H, N, N, generator=gen)
        gy = torch.randn(B, T, H, N, generator=gen, dtype=torch.float64)
        gs = torch.randn(B, H, N, N, generator=gen, dtype=torch.float64)
        fn = wkv6 if op == "wkv6" else wkv5
        res: dict[str, list[torch.Tensor]] = {}
        for label, dtype, backend in (
            ("chunked", torch.float32, "chunked"),
            ("naive", torch.float32, "naive"),
            ("fp64", torch.float64, "naive"),
        ):
            xs = [x.to(dev, dtype).detach().clone().requires_grad_() for x in (r, k, v, w, u, s)]
            y, sT = fn(*xs, backend=backend)
            ((y * gy.to(dev, y.dtype)).sum() + (sT * gs.to(dev, sT.dtype)).sum()).backward()
            res[label] = [y.detach(), sT.detach()] + [x.grad for x in xs]
        finite = all(bool(torch.isfinite(t).all()) for lab in ("chunked", "naive") for t in res[lab])
        diffs = [max_abs(a, b) for a, b in zip(res["chunked"], res["naive"])]
        rel_c = [rel_err(a, e) for a, e in zip(res["chunked"], res["fp64"])]
        rel_n = [rel_err(a, e) for a, e in zip(res["naive"], res["fp64"])]
        ok = finite and max(rel_c + rel_n) <= OPS_REL_LIMIT
        detail = " ".join(f"{n} {fmt(d)}" for n, d in zip(names, diffs))
        worst_c = names[int(np.argmax(rel_c))]
        rep.check(
            f"{op} {kind}",
            ok,
            f"{detail} | rel vs fp64: chunked {fmt(max(rel_c))} ({worst_c}) naive {fmt(max(rel_n))}"
            + ("" if finite else " NONFINITE"),
        )


# ------------------------------------------------------------------------------- 4. training


def pattern_tokens(path: Path, n: int, seed: int = 0, period: int = 13) -> None:
    """A learnable stream (as tests/test_train_helpers.py): a fixed random phrase repeated in
    documents of random length, each ended by token 0."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(1, TRAIN_VOCAB, size=period)
    out: list[int] = []
    while len(out) < n:
        length = int(rng.integers(20, 80))
        start = int(rng.integers(0, period))
        out.extend(phrase[(start + np.arange(length)) % period].tolist())
        out.append(0)
    np.save(path, np.asarray(out[:n], dtype=np.uint16))


def write_train_yaml(tmp: Path, sz: Sizes) -> Path:
    data = tmp / "tokens.npy"
    pattern_tokens(data, sz.tr_tokens)
    smoke = sz.device == "cpu"
    cfg = {
        "version": 6,
        "n_layer": 2,
        "n_embd": sz.tr_embd,
        "head_size": sz.tr_head,
        "vocab_size": TRAIN_VOCAB,
        "mix_lora": 16,
        "decay_lora": 32,
        "data": str(data),
        "ctx_len": sz.tr_ctx,
        "micro_bsz": sz.tr_bsz,
        "max_steps": sz.tr_steps,
        "warmup_steps": 0,
        "lr_init": 3e-3,
        "lr_final": 1e-3,
        "device": sz.device,
        "precision": "bf16",
        "threads": 1 if smoke else 0,
        "eval_every": 0,
        "eval_batches": 2,
        "save_every": 0,
        "progress": False,
    }
    path = tmp / "train.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return path


def child_env() -> dict[str, str]:
    """PATH, PYTHONPATH (the checkout first), HOME/TMPDIR/locale and everything CUDA/NCCL-related."""
    keep = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "OMP_NUM_THREADS", "USER")
    prefixes = ("CUDA", "NCCL_", "NVIDIA_", "CUBLAS", "CUDNN", "TORCH_", "TRITON_", "RWKVKIT_")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(prefixes)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    pp = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + pp if pp else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the child's own session: torchrun and its workers
    except (ProcessLookupError, PermissionError):
        pass


def run_child(cmd: Sequence[str], timeout: float) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, stdout+stderr, seconds); the whole process group dies on timeout."""
    global _CHILD
    t0 = time.monotonic()
    p = subprocess.Popen(
        list(cmd),
        cwd=ROOT,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _CHILD = p
    try:
        out, _ = p.communicate(timeout=max(timeout, 1.0))
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, _ = p.communicate()
        rc = None
    finally:
        _CHILD = None
    kill_group(p)  # stray workers, if any
    return rc, out or "", time.monotonic() - t0


PG_FIRST = """\
import os, sys
import torch
import torch.distributed as dist

backend = sys.argv[1]
if backend == "nccl":
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
else:
    dist.init_process_group("gloo")
from rwkvkit.train.cli import main

try:
    rc = main(sys.argv[2:])
finally:
    dist.destroy_process_group()
sys.exit(rc)
"""


def child_error(out: str) -> str:
    """The exception lines of a failed child (torchrun's own summary left out), then its last lines."""
    errs = [
        s
        for s in out.splitlines()
        if re.match(r"^([\w.]*(Error|Exception|Interrupt)\b|rwkvkit train:)", s)
        and "ChildFailedError" not in s
    ]
    head = "".join(f"    ! {s[:300]}\n" for s in dict.fromkeys(errs[-3:]))
    return head + tail(out, 3 if errs else 12)


def read_losses(run: Path) -> list[float]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    recs = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
    return [float(r["loss"]) for r in recs if "loss" in r]


def check_checkpoint(run: Path, vocab: int) -> str:
    """'' when rwkv-final.pth loads with rwkvkit.load and gives finite logits, else the problem."""
    import rwkvkit

    ckpt = run / "rwkv-final.pth"
    if not ckpt.is_file():
        return "no rwkv-final.pth"
    with torch.no_grad():
        logits, _ = rwkvkit.load(ckpt)(list(range(1, min(vocab, 9))))
    return "" if bool(torch.isfinite(logits).all()) else "non-finite logits from the final checkpoint"


def section_train(rep: Report, sz: Sizes, tmp: Path) -> None:
    cfg = write_train_yaml(tmp, sz)
    smoke = sz.device == "cpu"
    rep.line(
        f"  Finch L2 C{sz.tr_embd} V{TRAIN_VOCAB} ctx {sz.tr_ctx} bsz {sz.tr_bsz} bf16 on {sz.device}; "
        f"pattern stream (loss starts near ln {TRAIN_VOCAB} = {math.log(TRAIN_VOCAB):.2f})"
    )
    cli = ["-m", "rwkvkit.train.cli", "--config", str(cfg)]
    reserve = 20.0 if smoke else 45.0  # keep time for the speed section
    budget = lambda cap: min(cap, sz.time_limit - elapsed() - reserve)

    run = tmp / "run-single"
    rc, out, secs = run_child([sys.executable, *cli, f"out_dir={run}"], budget(sz.tr_timeout))
    losses = read_losses(run)
    first = losses[0] if losses else float("nan")
    if rc != 0 or len(losses) != sz.tr_steps:
        why = "timeout" if rc is None else f"exit {rc}"
        rep.check("single", False, f"{why}, {len(losses)} of {sz.tr_steps} steps logged, {secs:.0f} s")
        rep.line(child_error(out))
    else:
        n = max(1, min(5, len(losses) // 3))
        a, b = float(np.mean(losses[:n])), float(np.mean(losses[-n:]))
        problem = check_checkpoint(run, TRAIN_VOCAB)
        ok = b < a and all(math.isfinite(x) for x in losses) and not problem
        rep.check(
            "single",
            ok,
            f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} (mean of first/last {n}: "
            f"{a:.3f} -> {b:.3f}), {secs:.0f} s{'' if b < a else ', LOSS DID NOT FALL'}"
            f"{', ' + problem if problem else ', final checkpoint loads'}",
        )

    backend = "gloo" if smoke else "nccl"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    runs: list[tuple[str, str, list[str]]] = [
        ("ddp", f"torchrun x1 ddp ({backend})", ["-m", *cli[1:]]),
        ("fsdp", f"torchrun x1 fsdp ({backend})", ["-m", *cli[1:]]),
    ]
    while runs:
        strategy, name, entry = runs.pop(0)
        left = budget(sz.tr_dist_timeout)
        if left < 15:
            rep.check(name, False, f"skipped: only {left:.0f} s left")
            continue
        run = tmp / f"run-{strategy}-{len(runs)}"
        args = [f"strategy={strategy}", f"max_steps={sz.tr_dist_steps}", f"out_dir={run}"]
        rc, out, secs = run_child([*launcher, *entry, *args], left)
        losses = read_losses(run)
        if rc != 0 or len(losses) != sz.tr_dist_steps:
            why = "timeout" if rc is None else f"exit {rc}"
            rep.check(name, False, f"{why}, {len(losses)} of {sz.tr_dist_steps} steps logged, {secs:.0f} s")
            rep.line(child_error(out))
            if (
                strategy == "ddp"
                and "process group has not been initialized" in out
                and "workaround" not in name
            ):
                # rwkvkit only creates the process group when WORLD_SIZE > 1: run DDP once more with the
                # group made before rwkvkit starts, so the NCCL DDP path itself still gets exercised.
                wrapper = tmp / "pg_first.py"
                wrapper.write_text(PG_FIRST)
                runs.insert(
                    0,
                    (
                        "ddp",
                        f"{name} workaround: process group made first",
                        [str(wrapper), backend, *cli[2:]],
                    ),
                )
            continue
        problem = check_checkpoint(run, TRAIN_VOCAB)
        finite = all(math.isfinite(x) for x in losses)
        # step 1 sees the same initial weights and samples as the single run: its loss should match
        d1 = abs(losses[0] - first) if math.isfinite(first) else float("nan")
        rep.check(
            name,
            finite and not problem,
            f"{len(losses)} steps, final loss {losses[-1]:.3f} (step 1 {losses[0]:.4f}, |diff vs single| "
            f"{fmt(d1)}), {secs:.0f} s{', ' + problem if problem else ', final checkpoint loads'}",
        )


# ---------------------------------------------------------------------------------- 5. speed


def random_finch(
    layers: int, embd: int, vocab: int, device: str, matrix_dtype: torch.dtype
) -> torch.nn.Module:
    """A random Finch built directly on ``device`` (weights drawn there, with the distributions of
    ``rwkvkit.testing.random_checkpoint``, which draws on the CPU: too slow at 1.5B for this budget)."""
    from rwkvkit.checkpoint import _is_matrix
    from rwkvkit.config import ModelConfig, checkpoint_keys
    from rwkvkit.models import RWKV

    cfg = ModelConfig(6, layers, embd, vocab, head_size=64)
    g = torch.Generator(device=device).manual_seed(0)

    def U(shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=g, device=device) * (hi - lo) + lo

    sd: dict[str, torch.Tensor] = {}
    for key, shape in checkpoint_keys(cfg).items():
        name = key.split(".")[-1] if not key.endswith((".weight", ".bias")) else key.split(".")[-2]
        if key == "emb.weight":
            t = torch.randn(shape, generator=g, device=device)
        elif key.endswith(".bias"):
            t = U(shape, -0.2, 0.2)
        elif key.endswith("weight") and (".ln" in key or key.startswith("ln_out")):
            t = U(shape, 0.5, 1.5)
        elif name in ("time_maa_w1", "time_decay_w1"):
            t = U(shape, -0.5, 0.5) / shape[0] ** 0.5 * 4
        elif name == "time_maa_w2":
            t = U(shape, -0.5, 0.5) / shape[1] ** 0.5
        elif name == "time_decay_w2":
            t = U(shape, -1.0, 1.0) / shape[0] ** 0.5 * 2
        elif name.startswith("time_maa"):
            t = U(shape, 0.0, 1.0)
        elif name == "time_decay":
            t = U(shape, -6.0, 1.5)
        elif name == "time_faaaa":
            t = U(shape, -1.0, 1.0)
        else:  # linear [out, in]
            t = torch.randn(shape, generator=g, device=device) / shape[1] ** 0.5
        sd[key] = t.to(matrix_dtype) if _is_matrix(key) else t
    with torch.device("meta"):
        model = RWKV(cfg)
    model.load_state_dict(sd, assign=True, strict=True)
    return model


def measure(
    rep: Report, label: str, fn: Callable[[], None], device: str, reps: int, deadline: float
) -> float | None:
    """Best seconds of ``fn`` over up to ``reps`` runs after one warm-up (fewer when time runs short),
    with the peak memory counter reset first. None when skipped or failed (the error is reported)."""
    if time.monotonic() > deadline:
        rep.line(f"  {label}: skipped (section time budget spent)")
        return None
    cuda = device.startswith("cuda")
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.monotonic()
        fn()
        sync(device)
        best = math.inf
        for _ in range(reps):
            if time.monotonic() > deadline and math.isfinite(best):
                break
            t = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t)
        if not math.isfinite(best):  # deadline hit before one timed run: use the warm-up
            best = time.monotonic() - t0
        return best
    except torch.cuda.OutOfMemoryError:
        rep.line(f"  {label}: out of memory")
    except Exception:
        rep.line(f"  {label}: ERROR\n" + tail(traceback.format_exc(), 6))
    finally:
        if cuda:
            torch.cuda.synchronize()
    return None


def prefill(model: torch.nn.Module, prompt: torch.Tensor) -> None:
    with torch.inference_mode():
        model(prompt, last_only=True)


def decode(model: torch.nn.Module, tok0: torch.Tensor, steps: int) -> None:
    """``steps`` one-token calls from a fresh state for every row of ``tok0`` [B, 1], greedy."""
    with torch.inference_mode():
        st, tok = model.init_state(tok0.shape[0]), tok0
        for _ in range(steps):
            logits, st = model(tok, st)
            tok = logits[:, -1].argmax(-1, keepdim=True)


def train_step(model: torch.nn.Module, data: torch.Tensor) -> None:
    """Forward (bf16 autocast, chunked WKV), cross-entropy, backward; no optimiser step."""
    with torch.autocast(data.device.type, dtype=torch.bfloat16):
        logits, _ = model(data[:, :-1], backend="chunked")
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)


def peak_gib(device: str) -> str:
    if not device.startswith("cuda"):
        return "n/a"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


def section_speed(rep: Report, sz: Sizes) -> None:
    dev = sz.device
    left = sz.time_limit - elapsed() - 8
    budget = min(sz.sp_budget, left)
    if budget < 10:
        rep.line(f"  skipped: only {left:.0f} s left")
        return
    deadline = time.monotonic() + budget
    n_shapes = len(sz.speed_shapes)
    rep.line(f"  bf16 inference (fp32 master weights + bf16 autocast for training); budget {budget:.0f} s")
    for i, (name, L, D, V, train_b) in enumerate(sz.speed_shapes):
        # share what is left of the budget between the shapes still to run (the larger gets more)
        shape_deadline = time.monotonic() + (deadline - time.monotonic()) * (0.4 if i < n_shapes - 1 else 1.0)
        if time.monotonic() > deadline - 5:
            rep.line(f"  {name}: skipped (section time budget spent)")
            continue
        t0 = time.monotonic()
        with torch.no_grad():
            model = random_finch(L, D, V, dev, torch.bfloat16).eval().requires_grad_(False)
        sync(dev)
        n_par = sum(p.numel() for p in model.parameters()) / 1e9
        rep.line(
            f"  {name}: Finch L{L} C{D} V{V} ({n_par:.2f} B params, built in {time.monotonic() - t0:.1f} s)"
        )
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, V, (1, sz.sp_prompt), generator=gen).to(dev)

        sec = measure(rep, "prefill", partial(prefill, model, prompt), dev, 3, shape_deadline)
        if sec is not None:
            rep.line(f"    prefill T={sz.sp_prompt}: {sz.sp_prompt / sec:,.0f} tok/s  peak {peak_gib(dev)}")

        for batch in (1, sz.sp_batch):
            tok0 = torch.randint(0, V, (batch, 1), generator=gen).to(dev)

            fn = partial(decode, model, tok0, sz.sp_decode)
            sec = measure(rep, f"decode b{batch}", fn, dev, 2, shape_deadline)
            if sec is not None:
                rep.line(
                    f"    decode batch {batch} ({sz.sp_decode} steps): {batch * sz.sp_decode / sec:,.0f} tok/s"
                    f"  ({sec / sz.sp_decode * 1e3:.1f} ms/step)  peak {peak_gib(dev)}"
                )
        del model
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()

        if time.monotonic() > shape_deadline:
            rep.line("    train: skipped (time budget spent)")
            continue
        model = random_finch(L, D, V, dev, torch.float32).train().requires_grad_(True)
        B, T = train_b, sz.sp_train_T
        data = torch.randint(0, V, (B, T + 1), generator=gen).to(dev)

        sec = measure(rep, "train", partial(train_step, model, data), dev, 2, shape_deadline)
        if sec is not None:
            rep.line(f"    train fwd+bwd B={B} T={T}: {B * T / sec:,.0f} tok/s  peak {peak_gib(dev)}")
        del model, data
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks this script runs)"
    )
    ap.add_argument("--time-limit", type=float, default=0.0, help="watchdog seconds (default 230; smoke 900)")
    args = ap.parse_args(argv)
    limit = args.time_limit or (900.0 if args.cpu_smoke else 230.0)
    sz = smoke_sizes(limit) if args.cpu_smoke else gpu_sizes(limit)

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path.cwd()
    rep = Report(out_dir / "gpu_report.txt")
    watchdog = start_watchdog(rep, limit)
    warnings.filterwarnings("ignore")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))

    rep.line(f"rwkvkit GPU check ({'CPU smoke run' if args.cpu_smoke else 'GPU run'}), device {sz.device}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        rep.line("WARNING: CUDA is not available; the device sections will fail")
    with tempfile.TemporaryDirectory(prefix="rwkvkit-gpucheck-") as td:
        tmp = Path(td)
        run_section(rep, "1. environment", lambda: section_env(rep, sz), critical=False)
        run_section(
            rep, "2. parity (fp32 vs CPU; bf16 info)", lambda: section_parity(rep, sz, tmp), critical=True
        )
        run_section(rep, "3. WKV ops: chunked vs naive", lambda: section_ops(rep, sz), critical=True)
        run_section(rep, "4. training", lambda: section_train(rep, sz, tmp), critical=True)
        run_section(rep, "5. speed (informational)", lambda: section_speed(rep, sz), critical=False)
    watchdog.cancel()
    failed = bool(rep.failures)
    rep.line(f"RESULT: {'FAIL ' + str(rep.failures) if failed else 'OK'}  ({elapsed():.0f} s)")
    rep.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
