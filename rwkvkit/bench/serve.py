"""``rwkvkit bench serve``: aggregate decode tokens/s of the server at 1, 4 and 16 concurrent clients.

It starts the real server (``rwkvkit serve`` in its own process) on a loopback port with a random Finch of the 0.1B shape (L12 D768
V65536, from ``rwkvkit.testing.random_checkpoint``), then for each concurrency level starts that many
streaming clients at once, each asking for the same number of tokens. Aggregate decode tokens/s is
(all completion tokens) / (time from the first client's first token to the last client's last token),
so prefill is left out. Batching turns N clients into one [N, 1] forward per step; the target is
16 clients >= 6x the aggregate speed of 1.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..dtypes import DTYPES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_run(url: str, prompt: str, n: int, barrier: threading.Barrier, temperature: float) -> tuple:
    import httpx

    body = {"prompt": prompt, "max_tokens": n, "stream": True, "temperature": temperature, "top_p": 0.85,
            "stream_options": {"include_usage": True}}  # fmt: skip
    first = last = None
    tokens = 0
    barrier.wait()
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                first = first or now
                last = now
    return first, last, tokens


def run_level(url: str, clients: int, n_tokens: int, temperature: float) -> float:
    barrier = threading.Barrier(clients)
    prompts = [f"Client {i} says: hello, " + "and " * (i % 7) for i in range(clients)]
    with ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(lambda p: _client_run(url, p, n_tokens, barrier, temperature), prompts))
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    total = sum(r[2] for r in results)
    return total / (end - start)


def main(argv: list[str] | None = None) -> int:
    """``rwkvkit bench serve``: the server's aggregate decode speed at several concurrency levels."""
    p = argparse.ArgumentParser(prog="rwkvkit bench serve", description=main.__doc__)
    p.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--tokens", type=int, default=64, help="tokens each client asks for")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--embd", type=int, default=768)
    p.add_argument("--threads", type=int, default=0, help="server torch threads (0 = torch default)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=list(DTYPES),
        help="server weights (bf16: a batched step of 16 rows costs about one row's weight read on this CPU)",
    )
    args = p.parse_args(argv)
    levels = [int(x) for x in args.clients.split(",") if x.strip()]
    if not levels or min(levels) <= 0:
        p.error("--clients needs positive integers")
    import httpx

    from ..testing import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "finch.pth"
        random_checkpoint(6, n_layer=args.layers, n_embd=args.embd, vocab_size=65536, head_size=64, path=path)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        # The server runs in its own process (its own GIL), as it would in use; clients run here.
        cmd = [sys.executable, "-m", "rwkvkit.cli", "serve", "--model", str(path), "--port", str(port),
               "--max-batch", str(max(levels)), "--max-queue", str(max(levels)), "--max-tokens-limit",
               str(max(args.tokens, 8)), "--threads", str(args.threads), "--dtype", args.dtype]  # fmt: skip
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 300
            while True:
                if server.poll() is not None:
                    print(
                        "server failed to start:",
                        server.stderr.read().decode()[-2000:] if server.stderr else "",
                    )
                    return 1
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    print("server did not start within 300 s")
                    return 1
                time.sleep(0.2)
            return _run_levels(url, levels, args)
        finally:
            server.terminate()
            server.wait(timeout=30)


def _run_levels(url: str, levels: list[int], args: argparse.Namespace) -> int:
    import httpx

    threads = args.threads or "default"
    print(f"Finch L{args.layers} D{args.embd} V65536 {args.dtype}, server torch threads: {threads}, "
          f"{args.tokens} tokens per client, temperature {args.temperature}")  # fmt: skip
    try:
        run_level(url, 1, 8, args.temperature)  # warm-up
        speed = {}
        for n in levels:
            speed[n] = run_level(url, n, args.tokens, args.temperature)
            print(
                f"{n:3d} clients: {speed[n]:8.1f} decode tokens/s aggregate ({speed[n] / n:6.1f} per client)"
            )
        if 1 in speed and len(speed) > 1:
            top = max(speed)
            ratio = speed[top] / speed[1]
            print(f"{top} clients vs 1: {ratio:.1f}x (target >= 6x)")
    except httpx.HTTPError as e:
        print(f"benchmark request failed: {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
