"""``rwkvkit bench serve``: the real server under load, measured from its clients.

It starts the real server (``rwkvkit serve`` in its own process) on a loopback port with a random
Finch (default: the 0.1B shape L12 D768 V65536, from ``rwkvkit.testing.random_checkpoint``), then
measures (``--measure``, comma-separated):

- ``throughput``: for each concurrency level, that many streaming clients at once, each asking for
  the same number of tokens. Aggregate decode tokens/s is (all completion tokens) / (time from the
  first client's first token to the last client's last token), so prefill is left out. Batching
  turns N clients into one [N, 1] forward per step.
- ``gap``: the worst inter-token gap of a running stream while ``--long-prompts`` prompts of
  ``--long-tokens`` tokens arrive at once, against its median gap before they arrive. A server that
  prefills a prompt in one go inside its decode loop freezes every stream for the whole prefill; the
  interleaved engine feeds ``--prefill-slice`` prompt tokens per decode step.
- ``rss``: the server's resident memory (VmRSS) after each of ``--rounds`` rounds of
  ``--rss-clients`` streaming clients: it must level off, not grow round after round.

``--server-root DIR`` runs the server from another checkout of rwkvkit (its own C extensions built
in place), so the same measurement can be taken before and after a change, in one run of this file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..dtypes import DTYPES

MEASURES = ("throughput", "gap", "rss")


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
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=1800) as r:
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
    start = min(r[0] for r in results if r[0] is not None)
    end = max(r[1] for r in results if r[1] is not None)
    total = sum(r[2] for r in results)
    return total / max(end - start, 1e-9)


def _wait_idle(url: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        h = httpx.get(url + "/health", timeout=10).json()
        if not h.get("active") and not h.get("waiting"):
            return
        time.sleep(0.1)


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_gap(url: str, args: argparse.Namespace) -> dict:
    """Worst inter-token gap of one running stream while long prompts arrive (seconds)."""
    import httpx

    times: list[float] = []
    stop = threading.Event()
    failed: list[str] = []

    def stream() -> None:
        body = {
            "prompt": "Once upon a time",
            "max_tokens": args.gap_stream_tokens,
            "temperature": 0,
            "stream": True,
        }
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=1800) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"choices": [{' in line:
                        times.append(time.perf_counter())
                    if stop.is_set():
                        return  # closing the stream cancels the row
        except httpx.HTTPError as e:
            failed.append(str(e))

    th = threading.Thread(target=stream, daemon=True)
    th.start()
    deadline = time.time() + 600
    while len(times) < 24 and th.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    if len(times) < 24:
        raise RuntimeError(f"the running stream did not start: {failed}")
    before = [b - a for a, b in zip(times[4:23], times[5:24])]
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 65530) for _ in range(args.long_tokens)] for _ in range(args.long_prompts)]

    def long_request(ids: list[int]) -> int:
        return httpx.post(
            url + "/v1/completions", json={"prompt": ids, "max_tokens": 1}, timeout=3600
        ).status_code

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as ex:
        codes = list(ex.map(long_request, prompts))
    t1 = time.perf_counter()
    stop.set()
    th.join(timeout=60)
    if any(c != 200 for c in codes):
        raise RuntimeError(f"long prompts were refused: {codes}")
    last_before = max((t for t in times if t < t0), default=t0)
    window = [last_before] + [t for t in times if t0 <= t <= t1]
    after = [t for t in times if t > t1]
    if after:
        window.append(after[0])
    gaps = [b - a for a, b in zip(window, window[1:])]
    if not after:  # the stream produced nothing more after the prompts: the gap lasts at least to t1
        gaps.append(t1 - window[-1])
    return {"normal_gap_s": statistics.median(before), "worst_gap_s": max(gaps), "prefill_s": t1 - t0,
            "tokens_during": len(window) - 1}  # fmt: skip


def measure_rss(url: str, pid: int, args: argparse.Namespace) -> list[float]:
    out = []
    for i in range(args.rounds):
        run_level(url, args.rss_clients, args.rss_tokens, args.temperature)
        _wait_idle(url)
        time.sleep(0.5)
        out.append(rss_mb(pid))
        print(f"  round {i + 1:2d}: server RSS {out[-1]:7.1f} MB", flush=True)
    return out


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rwkvkit bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", default="throughput", help=f"comma-separated: {', '.join(MEASURES)}")
    p.add_argument("--clients", default="1,4,16", help="throughput: comma-separated concurrency levels")
    p.add_argument("--tokens", type=int, default=64, help="throughput: tokens each client asks for")
    p.add_argument("--long-prompts", type=int, default=4, help="gap: long prompts sent at once")
    p.add_argument("--long-tokens", type=int, default=8192, help="gap: tokens in each long prompt")
    p.add_argument("--gap-stream-tokens", type=int, default=100000, help="gap: budget of the running stream")
    p.add_argument("--rounds", type=int, default=10, help="rss: rounds of streaming clients")
    p.add_argument("--rss-clients", type=int, default=64, help="rss: streaming clients per round")
    p.add_argument("--rss-tokens", type=int, default=32, help="rss: tokens each client asks for")
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
    p.add_argument("--quantize", default=None, choices=["int8"], help="server matrices as int8")
    p.add_argument(
        "--prefill-slice", type=int, default=None, help="server --prefill-slice (default: its own)"
    )
    p.add_argument("--server-root", default=None, help="run the server from this rwkvkit checkout")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.clients.split(",") if x.strip()]
    args.measures = [m.strip() for m in args.measure.split(",") if m.strip()]
    if not args.levels or min(args.levels) <= 0:
        p.error("--clients needs positive integers")
    if not args.measures or any(m not in MEASURES for m in args.measures):
        p.error(f"--measure takes {', '.join(MEASURES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """``rwkvkit bench serve``: the server's speed, stream gaps under long prompts, and memory."""
    args = _args(argv)
    import httpx

    from ..testing import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "finch.pth"
        random_checkpoint(6, n_layer=args.layers, n_embd=args.embd, vocab_size=65536, head_size=64, path=path)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        batch = max(
            max(args.levels), args.rss_clients if "rss" in args.measures else 1, args.long_prompts + 1
        )
        limit = max(args.tokens, args.rss_tokens, args.gap_stream_tokens if "gap" in args.measures else 8)
        # The server runs in its own process (its own GIL), as it would in use; clients run here.
        cmd = [sys.executable, "-m", "rwkvkit.cli", "serve", "--model", str(path), "--port", str(port),
               "--max-batch", str(batch), "--max-queue", str(batch), "--max-tokens-limit", str(limit),
               "--max-prompt-tokens", str(max(args.long_tokens, 8192)), "--threads", str(args.threads),
               "--dtype", args.dtype]  # fmt: skip
        if args.quantize:
            cmd += ["--quantize", args.quantize]
        if args.prefill_slice:
            cmd += ["--prefill-slice", str(args.prefill_slice)]
        env = dict(os.environ)
        if args.server_root:
            env["PYTHONPATH"] = str(Path(args.server_root).resolve())
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                  cwd=args.server_root or None)  # fmt: skip
        try:
            deadline = time.time() + 600
            while True:
                if server.poll() is not None:
                    err = server.stderr.read().decode()[-2000:] if server.stderr else ""
                    print("server failed to start:", err)
                    return 1
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    print("server did not start within 600 s")
                    return 1
                time.sleep(0.2)
            return _run(url, server.pid, args)
        finally:
            server.terminate()
            server.wait(timeout=60)


def _run(url: str, pid: int, args: argparse.Namespace) -> int:
    import httpx

    threads = args.threads or "default"
    where = f", server from {args.server_root}" if args.server_root else ""
    print(f"Finch L{args.layers} D{args.embd} V65536 {args.dtype}{' int8' if args.quantize else ''}, "
          f"server torch threads: {threads}{where}", flush=True)  # fmt: skip
    results: dict = {}
    try:
        run_level(url, 1, 8, args.temperature)  # warm-up
        if "throughput" in args.measures:
            speed = {}
            for n in args.levels:
                speed[n] = run_level(url, n, args.tokens, args.temperature)
                print(
                    f"{n:3d} clients: {speed[n]:8.1f} decode tokens/s aggregate ({speed[n] / n:6.1f} per client)"
                )
            if 1 in speed and len(speed) > 1:
                top = max(speed)
                print(f"{top} clients vs 1: {speed[top] / speed[1]:.1f}x")
            results["throughput"] = speed
        if "gap" in args.measures:
            g = measure_gap(url, args)
            print(f"gap: {args.long_prompts} x {args.long_tokens}-token prompts arrive while a stream runs: worst "
                  f"inter-token gap {g['worst_gap_s'] * 1e3:.0f} ms (median before {g['normal_gap_s'] * 1e3:.1f} ms, "
                  f"{g['worst_gap_s'] / g['normal_gap_s']:.1f}x); the prompts took {g['prefill_s']:.1f} s, "
                  f"the stream got {g['tokens_during']} tokens meanwhile", flush=True)  # fmt: skip
            results["gap"] = g
        if "rss" in args.measures:
            print(
                f"rss: {args.rounds} rounds of {args.rss_clients} streaming clients x {args.rss_tokens} tokens"
            )
            rss = measure_rss(url, pid, args)
            tail = rss[len(rss) // 2 - 1 :]
            print(f"rss: round 1 {rss[0]:.0f} MB, last {rss[-1]:.0f} MB; rounds {len(rss) // 2}..{len(rss)} "
                  f"span {max(tail) - min(tail):.0f} MB")  # fmt: skip
            results["rss_mb"] = rss
    except (httpx.HTTPError, RuntimeError) as e:
        print(f"benchmark request failed: {e}")
        return 1
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
