"""``rwkvkit bench serve``: the real server under load, measured from its clients.

It starts the real server (``rwkvkit serve`` in its own process) on a loopback port with a random
model (``--version``: 6 Finch by default, 7 Goose; the 0.1B shape L12 D768 V65536, from
``rwkvkit.testing.random_checkpoint``), then
measures (``--measure``, comma-separated):

- ``throughput``: for each concurrency level, that many streaming clients at once, each asking for
  the same number of tokens. Aggregate decode tokens/s is (all completion tokens) / (time from the
  first client's first token to the last client's last token), so the first prompt's prefill is left
  out but the later arrivals' are in. Beside it, the sum of the clients' own decode rates (each
  client's tokens over its own first-to-last-token span: what the streams see once running). Batching
  turns N clients into one [N, 1] forward per step. The levels run ``--repeat`` rounds, interleaved
  (1, 16, 1, 16, ...), so that every level sees the same load on a shared machine; each figure is
  the median over the rounds, and the ratio of the top level to one client is the median of the
  rounds' own ratios (each round's printed beside it).
- ``chat``: time to first token of a chat whose history is ``--chat-history`` tokens (turn 1, a
  history the server has never seen), then of its turn 2 (turn 1's messages + the reply + a new
  question): the server keeps the state after each reply, so turn 2 prefills only its new tokens.
  A third request continues an edited reply: only turn 1's prompt is cached, as before replies
  were kept. The random model's reply is steered with ``logit_bias`` to a word the tokenizer gives
  back as it came (a trained model's replies do that by themselves).
- ``gap``: the worst inter-token gap of a running stream while ``--long-prompts`` prompts of
  ``--long-tokens`` tokens arrive at once, against its median gap before they arrive. A server that
  prefills a prompt in one go inside its decode loop freezes every stream for the whole prefill; the
  interleaved engine feeds ``--prefill-slice`` prompt tokens per decode step.
- ``profile``: where a decode step's time goes (``serve_profile``): with ``throughput``, the
  server's own timings per step at each level (model, sampling, logprobs, the per-row loop with the
  text hooks, prompt slices); and the fewest and the most clients' rows decoded in this process without
  HTTP (CPU time), the most against the fewest: what a batched step costs per row on one core.
- ``rss``: the server's resident memory (VmRSS) after each of ``--rounds`` rounds of
  ``--rss-clients`` streaming clients: it must level off, not grow round after round.

``--server-root DIR`` runs the server from another checkout of rwkvkit (its own C extensions built
in place), so the same measurement can be taken before and after a change, in one run of this file.
The clients use only the standard library (``http.client``): the ``serve`` extra is all it needs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..cli_args import non_negative_int, positive_int
from ..dtypes import DTYPES
from ..models import registry
from .serve_client import HTTPError, get_json, measure_chat, measure_gap, measure_rss, run_level
from .serve_profile import profile_in_process

MEASURES = ("throughput", "chat", "gap", "rss", "profile")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MIN_GAP_STREAM_TOKENS = 64  # the gap measure reads 24 tokens before the prompts arrive, and needs more after


def _gap_stream_tokens(v: str) -> int:
    n = positive_int(v)
    if n < MIN_GAP_STREAM_TOKENS:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_GAP_STREAM_TOKENS} (the stream must run on while the long prompts arrive), got {n}"
        )
    return n


def _folder(v: str) -> str:
    if not Path(v).is_dir():
        raise argparse.ArgumentTypeError(f"{v!r} is not a folder")
    return v


_folder.__name__ = "folder"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rwkvkit bench serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--measure", default="throughput", help=f"comma-separated: {', '.join(MEASURES)}")
    p.add_argument("--clients", default="1,4,16", help="throughput: comma-separated concurrency levels")
    p.add_argument("--tokens", type=positive_int, default=64, help="throughput: tokens each client asks for")
    p.add_argument(
        "--repeat",
        type=positive_int,
        default=3,
        help="throughput: interleaved rounds of the levels (median kept)",
    )
    p.add_argument("--long-prompts", type=positive_int, default=4, help="gap: long prompts sent at once")
    p.add_argument("--long-tokens", type=positive_int, default=8192, help="gap: tokens in each long prompt")
    p.add_argument(
        "--gap-stream-tokens",
        type=_gap_stream_tokens,
        default=100000,
        help=f"gap: budget of the running stream (>= {MIN_GAP_STREAM_TOKENS}; it must outlast the long prompts)",
    )
    p.add_argument("--rounds", type=positive_int, default=10, help="rss: rounds of streaming clients")
    p.add_argument("--rss-clients", type=positive_int, default=64, help="rss: streaming clients per round")
    p.add_argument("--rss-tokens", type=positive_int, default=32, help="rss: tokens each client asks for")
    p.add_argument(
        "--version", type=int, default=6, help="RWKV version of the random model (6: Finch, 7: Goose)"
    )
    p.add_argument("--layers", type=positive_int, default=12)
    p.add_argument("--embd", type=positive_int, default=768)
    p.add_argument(
        "--threads", type=non_negative_int, default=0, help="server torch threads (0 = torch default)"
    )
    p.add_argument(
        "--chat-history", type=positive_int, default=2000, help="chat: tokens of history before turn 1"
    )
    p.add_argument("--chat-reply", type=positive_int, default=32, help="chat: tokens of each reply")
    p.add_argument("--temperature", type=float, default=1.0, help="throughput, rss: temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.85, help="throughput, rss: top_p (RWKV's default 0.85)")
    p.add_argument(
        "--dtype",
        default="bf16",
        choices=list(DTYPES),
        help="server weights (bf16: a batched step of 16 rows costs about one row's weight read on this CPU)",
    )
    p.add_argument("--quantize", default=None, choices=["int8"], help="server matrices as int8")
    p.add_argument(
        "--prefill-slice", type=positive_int, default=None, help="server --prefill-slice (default: its own)"
    )
    p.add_argument(
        "--server-root", type=_folder, default=None, help="run the server from this rwkvkit checkout"
    )
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = p.parse_args(argv)
    args.profiles = {}
    args.levels = [int(x) for x in args.clients.split(",") if x.strip()]
    args.measures = [m.strip() for m in args.measure.split(",") if m.strip()]
    try:
        registry.get(args.version)
    except ValueError as e:
        p.error(str(e))
    if not args.levels or min(args.levels) <= 0:
        p.error("--clients needs positive integers")
    if args.repeat <= 0:
        p.error("--repeat needs a positive integer")
    if not args.measures or any(m not in MEASURES for m in args.measures):
        p.error(f"--measure takes {', '.join(MEASURES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """``rwkvkit bench serve``: the server's speed, chat turns, stream gaps under long prompts, and memory."""
    args = _args(argv)
    from ..testing import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"RWKV-x0{args.version}0-random.pth"
        random_checkpoint(
            args.version, n_layer=args.layers, n_embd=args.embd, vocab_size=65536, head_size=64, path=path
        )
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        batch = max(
            max(args.levels), args.rss_clients if "rss" in args.measures else 1, args.long_prompts + 1
        )
        limit = max(args.tokens, args.rss_tokens, args.chat_reply,
                    args.gap_stream_tokens if "gap" in args.measures else 8)  # fmt: skip
        # The server runs in its own process (its own GIL), as it would in use; clients run here.
        cmd = [sys.executable, "-m", "rwkvkit.cli", "serve", "--model", str(path), "--port", str(port),
               "--max-batch", str(batch), "--max-queue", str(batch), "--max-tokens-limit", str(limit),
               "--max-prompt-tokens", str(max(args.long_tokens, 2 * args.chat_history, 8192)), "--threads", str(args.threads),
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
                    get_json(url + "/health", timeout=1)
                    break
                except HTTPError:
                    pass
                if time.time() > deadline:
                    print("server did not start within 600 s")
                    return 1
                time.sleep(0.2)
            code, results = _run(url, server.pid, args)
        finally:
            server.terminate()
            server.wait(timeout=60)
        if code == 0 and "profile" in args.measures:
            results["profile"] = {"server": args.profiles, "in_process": profile_in_process(path, args)}
        if code == 0 and args.json:
            print(json.dumps(results))
        return code


def _run(url: str, pid: int, args: argparse.Namespace) -> tuple[int, dict]:
    """The measures against the running server: (exit code, results)."""
    threads = args.threads or "default"
    where = f", server from {args.server_root}" if args.server_root else ""
    name = registry.get(args.version).name
    print(f"{name} L{args.layers} D{args.embd} V65536 {args.dtype}{' int8' if args.quantize else ''}, "
          f"server torch threads: {threads}{where}", flush=True)  # fmt: skip
    results: dict = {}
    try:
        run_level(url, 1, 8, args)  # warm-up
        if "throughput" in args.measures:
            speed, streams = _throughput(url, pid, args)
            results["throughput"] = speed
            results["throughput_streams"] = streams
        if "chat" in args.measures:
            c = measure_chat(url, args)
            one = c["turn1"]
            print(
                f"chat: history {one['prompt_tokens']} tokens, replies of {args.chat_reply} tokens; time to first token:"
            )
            for key, what in (("turn1", "turn 1 (nothing cached)"), ("turn2", "turn 2 (the state after the reply)"),
                              ("turn2_edited", "turn 2 after an edited reply (turn 1's prompt cached)")):  # fmt: skip
                t = c[key]
                print(f"  {what:54s} {t['ttft_s'] * 1e3:8.1f} ms  ({t['ttft_s'] / one['ttft_s']:5.3f}x turn 1; "
                      f"prompt {t['prompt_tokens']} tokens, {t['cached_tokens']} cached)", flush=True)  # fmt: skip
            results["chat"] = {k: {x: y for x, y in v.items() if x != "reply"} for k, v in c.items()}
        if "gap" in args.measures:
            g = measure_gap(url, args)
            if g["worst_gap_s"] is None:
                print(f"gap: not measured: the running stream ended (its {args.gap_stream_tokens} tokens) "
                      f"{g['stream_ended_s']:.1f} s into the {g['prefill_s']:.1f} s the prompts took, so the time "
                      "after its end is no gap; raise --gap-stream-tokens", file=sys.stderr, flush=True)  # fmt: skip
            else:
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
    except (HTTPError, RuntimeError) as e:
        print(f"benchmark request failed: {e}")
        return 1, results
    return 0, results


def _throughput(url: str, pid: int, args: argparse.Namespace) -> tuple[dict, dict]:
    """Each level ``args.repeat`` times, interleaved; prints every round and the medians; returns the
    median (aggregate, streams' own) tokens/s per level."""
    rounds: list[dict[int, tuple[float, float]]] = []
    for r in range(args.repeat):
        tag = f"Round {r + 1}. " if r else ""  # prompts new to the prefix cache in every round
        got = {n: run_level(url, n, args.tokens, args, pid, tag) for n in args.levels}
        rounds.append(got)
        line = ", ".join(f"{n} clients {a:.1f} ({s:.1f})" for n, (a, s) in got.items())
        print(f"  round {r + 1}: tokens/s aggregate (streams' own): {line}", flush=True)
    speed = {n: statistics.median(g[n][0] for g in rounds) for n in args.levels}
    streams = {n: statistics.median(g[n][1] for g in rounds) for n in args.levels}
    for n in args.levels:
        print(f"{n:3d} clients: {speed[n]:8.1f} decode tokens/s aggregate ({speed[n] / n:6.1f} per client); "
              f"sum of the streams' own rates {streams[n]:8.1f}", flush=True)  # fmt: skip
    top = max(args.levels)
    if 1 in speed and top > 1:
        ratios = [(g[top][0] / g[1][0], g[top][1] / g[1][1]) for g in rounds]
        each = ", ".join(f"{a:.1f}x/{s:.1f}x" for a, s in ratios)
        print(f"{top} clients vs 1 (median of {len(rounds)} rounds' ratios): "
              f"{statistics.median(a for a, _ in ratios):.1f}x aggregate, "
              f"{statistics.median(s for _, s in ratios):.1f}x the streams' own rates  (rounds: {each})")  # fmt: skip
    return speed, streams


if __name__ == "__main__":
    raise SystemExit(main())
