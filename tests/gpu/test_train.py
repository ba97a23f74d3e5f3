"""Training on the GPU: ``python -m rwkvkit.train.cli`` on a tiny learnable token stream (Finch L2,
bf16, the loss must fall and the final checkpoint load), then DDP and FSDP2 under torchrun over NCCL
with one process per GPU (gloo on the CPU)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkvkit

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64


def pattern_tokens(path: Path, n: int, seed: int = 0, period: int = 13) -> None:
    """A learnable stream: a fixed random phrase repeated in documents of random length, each ended by 0."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(1, VOCAB, size=period)
    out: list[int] = []
    while len(out) < n:
        length, start = int(rng.integers(20, 80)), int(rng.integers(0, period))
        out.extend(phrase[(start + np.arange(length)) % period].tolist())
        out.append(0)
    np.save(path, np.asarray(out[:n], dtype=np.uint16))


@pytest.fixture(scope="module")
def config(sizes, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gpu-train")
    data = tmp / "tokens.npy"
    pattern_tokens(data, sizes.tr_tokens)
    cpu = sizes.device == "cpu"
    model = dict(version=6, n_layer=2, n_embd=sizes.tr_embd, head_size=sizes.tr_head, vocab_size=VOCAB, mix_lora=16,
                 decay_lora=32)  # fmt: skip
    cfg = dict(
        model=model, data=str(data), ctx_len=sizes.tr_ctx, micro_bsz=sizes.tr_bsz, max_steps=sizes.tr_steps,
        warmup_steps=0, lr_init=3e-3, lr_final=1e-3, device=sizes.device, precision="bf16",
        threads=1 if cpu else 0, eval_every=0, eval_batches=2, save_every=0, progress=False,
    )  # fmt: skip
    path = tmp / "train.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return path


def run(cmd: Sequence[str], timeout: float) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, stdout + stderr, seconds); the child's whole process group (torchrun
    and its workers) is killed on timeout and afterwards."""
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen(
        list(cmd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = p.communicate(timeout=timeout)
        rc: int | None = p.returncode
    except subprocess.TimeoutExpired:
        rc, out = None, ""
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if rc is None:
        out = p.communicate()[0]
    return rc, out or "", time.monotonic() - t0


def losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.is_file() else []
    return [float(r["loss"]) for r in recs if "loss" in r]


def final_checkpoint_runs(run_dir: Path) -> bool:
    with torch.no_grad():
        logits, _ = rwkvkit.load(run_dir / "rwkv-final.pth")(list(range(1, 9)))
    return bool(torch.isfinite(logits).all())


def test_single_process_training_learns(sizes, report, config, tmp_path):
    out_dir = tmp_path / "single"
    cmd = [sys.executable, "-m", "rwkvkit.train.cli", "--config", str(config), f"out_dir={out_dir}"]
    rc, out, secs = run(cmd, sizes.tr_timeout)
    got = losses(out_dir)
    assert rc == 0 and len(got) == sizes.tr_steps, out[-3000:]
    n = max(1, min(5, len(got) // 3))
    first, last = float(np.mean(got[:n])), float(np.mean(got[-n:]))
    report(
        f"train single {sizes.device}: {len(got)} steps, loss {got[0]:.3f} -> {got[-1]:.3f} "
        f"(mean of first/last {n}: {first:.3f} -> {last:.3f}), {secs:.0f} s"
    )
    assert all(math.isfinite(x) for x in got) and last < first
    assert final_checkpoint_runs(out_dir)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_training(sizes, report, config, tmp_path, strategy):
    nproc = torch.cuda.device_count() if sizes.device == "cuda" else 1
    out_dir = tmp_path / strategy
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "rwkvkit.train.cli", "--config", str(config), f"strategy={strategy}",
        f"max_steps={sizes.tr_dist_steps}", f"out_dir={out_dir}",
    ]  # fmt: skip
    rc, out, secs = run(cmd, sizes.tr_timeout)
    got = losses(out_dir)
    backend = "nccl" if sizes.device == "cuda" else "gloo"
    report(
        f"train torchrun x{nproc} {strategy} ({backend}): exit {rc}, {len(got)} steps, "
        f"final loss {got[-1] if got else float('nan'):.3f}, {secs:.0f} s"
    )
    assert rc == 0 and len(got) == sizes.tr_dist_steps, out[-3000:]
    assert all(math.isfinite(x) for x in got)
    assert final_checkpoint_runs(out_dir)
