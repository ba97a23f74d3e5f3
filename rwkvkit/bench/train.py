"""``rwkvkit bench train``: training throughput (forward + backward tokens/s), chunked vs naive WKV.

One run times, for each shape, one training micro-step (forward, cross-entropy, backward; no
optimiser) of a freshly initialised Finch with the chunked parallel WKV and with the naive per-step
loop, on random tokens, and prints tokens/s and the chunked/naive speed-up:

- ``0.1B``: the released 0.1B Finch shape, L12 C768 V65536 (head 64), ctx 512, batch ``--batch``.
- ``tiny``: L2 C128 V1024 (head 64), ctx 512, batch 4.

Each row is the best of ``--repeat`` timed runs after one warm-up on a short sequence. Times are
wall-clock; on a shared machine pass ``--threads`` and compare rows of the same run. ``--shapes``
selects rows; ``--json`` prints one JSON object per row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..cli_args import csv_choices, non_negative_int, positive_int

BACKENDS = ("chunked", "naive", "auto")  # what --backends takes (the model's backends with a backward)
SHAPES = {
    "0.1B": dict(n_layer=12, n_embd=768, vocab_size=65536, ctx=512),
    "tiny": dict(n_layer=2, n_embd=128, vocab_size=1024, ctx=512, batch=4),
}


def build(shape: dict, device: str) -> torch.nn.Module:
    from rwkvkit.config import ModelConfig
    from rwkvkit.models import RWKV
    from rwkvkit.train.init import init_weights

    cfg = ModelConfig(6, shape["n_layer"], shape["n_embd"], shape["vocab_size"], head_size=64)
    return init_weights(RWKV(cfg), seed=0).to(device).train()


def step_time(model: torch.nn.Module, tokens: torch.Tensor, backend: str, autocast: bool) -> float:
    """Seconds for one forward + backward of ``tokens`` [B, T+1]."""
    x, y = tokens[:, :-1], tokens[:, 1:]
    dev = tokens.device.type
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        logits, _ = model(x, backend=backend)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def run(
    names: list[str], batch: int, ctx: int | None, repeat: int, device: str, backends: list[str]
) -> list[dict]:
    rows = []
    autocast = device.startswith("cuda")
    for name in names:
        shape = dict(SHAPES[name])
        T = ctx or shape["ctx"]
        B = shape.get("batch", batch)
        model = build(shape, device)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, shape["vocab_size"], (B, T + 1), generator=g).to(device)
        speeds = {}
        for backend in backends:
            step_time(model, tokens[:, :17], backend, autocast)  # warm-up
            best = min(step_time(model, tokens, backend, autocast) for _ in range(repeat))
            speeds[backend] = B * T / best
            rows.append(
                {
                    "shape": name,
                    "layers": shape["n_layer"],
                    "n_embd": shape["n_embd"],
                    "vocab": shape["vocab_size"],
                    "batch": B,
                    "ctx": T,
                    "backend": backend,
                    "seconds": round(best, 3),
                    "tokens_per_s": round(B * T / best, 1),
                }
            )
        # the speed-up goes on the shape's last row in JSON; the table prints it on chunked's
        if "chunked" in speeds and "naive" in speeds:
            rows[-1]["chunked_speedup"] = round(speeds["chunked"] / speeds["naive"], 2)
        del model
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rwkvkit bench train", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shapes",
        type=csv_choices(list(SHAPES)),
        default="tiny,0.1B",
        help="comma list of: " + ", ".join(SHAPES),
    )
    ap.add_argument("--batch", type=positive_int, default=1, help="batch of the 0.1B shape (tiny uses 4)")
    ap.add_argument("--ctx", type=positive_int, default=None, help="override every shape's ctx (default 512)")
    ap.add_argument("--repeat", type=positive_int, default=1)
    ap.add_argument(
        "--backends",
        type=csv_choices(BACKENDS),
        default="chunked,naive",
        help="comma list of: " + ", ".join(BACKENDS),
    )
    ap.add_argument("--threads", type=non_negative_int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    names = a.shapes
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    backends = a.backends
    print(
        f"# training throughput, forward + backward, Finch, device {a.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        file=sys.stderr,
    )
    if not a.json:
        print(
            f"{'shape':<6} {'L':>3} {'C':>5} {'V':>6} {'B':>3} {'ctx':>5} {'backend':<8} {'s/step':>8} "
            f"{'tok/s':>9} {'speed-up':>8}"
        )
    for rows in _rows_streamed(names, a, backends):
        speedup = next((r["chunked_speedup"] for r in rows if "chunked_speedup" in r), None)
        for row in rows:
            if a.json:
                print(json.dumps(row), flush=True)
                continue
            # chunked against naive: on the chunked row, where "2.3x" reads as chunked being faster
            up = f"{speedup}x" if speedup is not None and row["backend"] == "chunked" else ""
            print(
                f"{row['shape']:<6} {row['layers']:>3} {row['n_embd']:>5} {row['vocab']:>6} {row['batch']:>3} "
                f"{row['ctx']:>5} {row['backend']:<8} {row['seconds']:>8.3f} {row['tokens_per_s']:>9.1f} {up:>8}",
                flush=True,
            )
    return 0


def _rows_streamed(names: list[str], a: argparse.Namespace, backends: list[str]) -> Iterator[list[dict]]:
    """The rows of each shape in turn, printed as soon as that shape is measured."""
    for name in names:
        yield run([name], a.batch, a.ctx, a.repeat, a.device, backends)


if __name__ == "__main__":
    sys.exit(main())
