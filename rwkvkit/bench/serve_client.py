"""The clients of ``rwkvkit bench serve`` (standard library only: ``http.client``, threads) and its
measures: ``run_level`` (throughput of N streaming clients), ``measure_gap``, ``measure_chat`` and
``measure_rss``; see ``rwkvkit.bench.serve`` for what each measures."""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from .serve_profile import cpu_seconds, describe, per_step


class HTTPError(Exception):
    """A request that failed: no connection, a timeout, or a status other than 200."""


def _conn(url: str, timeout: float) -> http.client.HTTPConnection:
    u = urlsplit(url)
    return http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=timeout)


def get_json(url: str, timeout: float = 10) -> dict:
    c = _conn(url, timeout)
    try:
        c.request("GET", urlsplit(url).path)
        r = c.getresponse()
        if r.status != 200:
            raise HTTPError(f"GET {url}: {r.status}")
        return json.loads(r.read())
    except (OSError, http.client.HTTPException) as e:
        raise HTTPError(f"GET {url}: {e}") from e
    finally:
        c.close()


def post_json(url: str, body: dict, timeout: float = 3600) -> dict:
    return json.loads("".join(_post(url, body, timeout, stream=False)))


def stream_events(url: str, body: dict, timeout: float = 1800) -> Iterator[dict]:
    """The ``data: {...}`` chunks of a streaming request, parsed, as they arrive (closing the
    iterator early closes the connection, which cancels the request on the server)."""
    for line in _post(url, body, timeout, stream=True):
        if line.startswith("data: {"):
            yield json.loads(line[6:])


def _post(url: str, body: dict, timeout: float, stream: bool) -> Iterator[str]:
    c = _conn(url, timeout)
    try:
        c.request(
            "POST", urlsplit(url).path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        r = c.getresponse()
        if r.status != 200:
            raise HTTPError(f"POST {url}: {r.status} {r.read()[:300]!r}")
        if not stream:
            yield r.read().decode()
            return
        for raw in r:
            yield raw.decode().rstrip("\r\n")
    except (OSError, http.client.HTTPException) as e:
        raise HTTPError(f"POST {url}: {e}") from e
    finally:
        c.close()


def _client_run(url: str, prompt: str, n: int, barrier: threading.Barrier, args: argparse.Namespace) -> tuple:
    body = {"prompt": prompt, "max_tokens": n, "stream": True, "temperature": args.temperature, "top_p": args.top_p,
            "stream_options": {"include_usage": True}}  # fmt: skip
    first = last = None
    tokens = 0
    barrier.wait()
    for chunk in stream_events(url + "/v1/completions", body):
        now = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk.get("choices"):
            first = first or now
            last = now
    return first, last, tokens


def run_level(
    url: str, clients: int, n_tokens: int, args: argparse.Namespace, pid: int = 0, tag: str = ""
) -> tuple[float, float]:
    """(aggregate decode tokens/s of ``clients`` streaming clients over the whole window, the sum of
    their own decode rates); with ``--measure profile`` also prints the server's time per decode step,
    part by part, during the run. ``tag`` starts every prompt: a new tag, prompts the server's prefix
    cache has not seen."""
    barrier = threading.Barrier(clients)
    prompts = [f"{tag}Client {i} says: hello, " + "and " * (i % 7) for i in range(clients)]
    before = get_json(url + "/health").get("timings")  # None from a server without timings
    t0, c0 = time.perf_counter(), cpu_seconds(pid) if pid else 0.0
    with ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(lambda p: _client_run(url, p, n_tokens, barrier, args), prompts))
    wall, cpu_s = time.perf_counter() - t0, (cpu_seconds(pid) - c0 if pid else None)
    if before and "profile" in args.measures and "throughput" in args.measures and n_tokens == args.tokens:
        p = per_step(before, get_json(url + "/health")["timings"], wall, cpu_s)
        print("  " + describe(f"server, {clients} clients", p), flush=True)
        args.profiles[clients] = p
    start = min(r[0] for r in results if r[0] is not None)
    end = max(r[1] for r in results if r[1] is not None)
    total = sum(r[2] for r in results)
    streams = sum(max(r[2] - 1, 0) / (r[1] - r[0]) for r in results if r[0] is not None and r[1] > r[0])
    return total / max(end - start, 1e-9), streams


def _wait_idle(url: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = get_json(url + "/health")
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
    """Worst inter-token gap of one running stream while long prompts arrive (seconds). When the stream
    ends by itself before the prompts are done, ``worst_gap_s`` is None (the time after its end is no
    gap) and ``stream_ended_s`` says when it ended, counted from the prompts' arrival."""
    times: list[float] = []
    ended: list[float] = []  # when the stream ended by itself (its budget spent), not closed by us
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
            events = stream_events(url + "/v1/completions", body)
            for chunk in events:
                if chunk.get("choices"):
                    times.append(time.perf_counter())
                if stop.is_set():
                    events.close()  # closing the stream cancels the row
                    return
            ended.append(time.perf_counter())
        except HTTPError as e:
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

    def long_request(ids: list[int]) -> dict:
        return post_json(url + "/v1/completions", {"prompt": ids, "max_tokens": 1})

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as ex:
        list(ex.map(long_request, prompts))  # raises HTTPError if one is refused
    t1 = time.perf_counter()
    stop.set()
    th.join(timeout=60)
    if ended and ended[0] < t1:
        return {"normal_gap_s": statistics.median(before), "worst_gap_s": None, "prefill_s": t1 - t0,
                "tokens_during": sum(t0 <= t <= t1 for t in times), "stream_ended_s": ended[0] - t0}  # fmt: skip
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


def _chat_turn(url: str, messages: list[dict], args: argparse.Namespace, bias: dict) -> dict:
    """One streaming chat request: time to its first text, its reply and its usage."""
    body = {"messages": messages, "max_tokens": args.chat_reply, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": bias}  # fmt: skip
    t0 = time.perf_counter()
    first, text, usage = None, "", {}
    for chunk in stream_events(url + "/v1/chat/completions", body):
        usage = chunk.get("usage") or usage
        for ch in chunk.get("choices", []):
            piece = ch["delta"].get("content")
            if piece:
                first = first or time.perf_counter()
                text += piece
    if first is None:
        raise RuntimeError("the chat reply was empty")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "ttft_s": first - t0,
        "reply": text,
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": cached,
    }


def measure_chat(url: str, args: argparse.Namespace) -> dict:
    """Time to first token of turn 1 of a chat with a long history, of turn 2, and of turn 2 after an
    edited reply (only turn 1's prompt cached)."""
    from ..serve.protocol import chat_prompt
    from ..tokenizer import Tokenizer

    tok = Tokenizer()
    rng = random.Random(time.time_ns())  # a history this server has not seen
    words = "the river light stone house music winter reads quiet garden over under bright old new".split()
    msgs = [{"role": "system", "content": f"Session {rng.randrange(10**9)}. You are a helpful assistant."}]

    def size(m: list[dict]) -> int:
        return len(tok.encode(chat_prompt([(x["role"], x["content"]) for x in m])))

    while size(msgs) < args.chat_history:
        role = "user" if msgs[-1]["role"] != "user" else "assistant"
        msgs.append(
            {"role": role, "content": " ".join(rng.choice(words) for _ in range(40)).capitalize() + "."}
        )
    if msgs[-1]["role"] == "user":
        msgs.append({"role": "assistant", "content": "I see."})
    msgs.append({"role": "user", "content": "What did I say first?"})
    bias = {str(tok.encode(" Hello")[0]): 100}  # a reply that tokenizes back to the same tokens
    one = _chat_turn(url, msgs, args, bias)
    nxt = {"role": "user", "content": "And then?"}
    two = _chat_turn(url, [*msgs, {"role": "assistant", "content": one["reply"]}, nxt], args, bias)
    edited = _chat_turn(
        url, [*msgs, {"role": "assistant", "content": "Edited:" + one["reply"]}, nxt], args, bias
    )
    return {"turn1": one, "turn2": two, "turn2_edited": edited}


def measure_rss(url: str, pid: int, args: argparse.Namespace) -> list[float]:
    out = []
    for i in range(args.rounds):
        run_level(url, args.rss_clients, args.rss_tokens, args)
        _wait_idle(url)
        time.sleep(0.5)
        out.append(rss_mb(pid))
        print(f"  round {i + 1:2d}: server RSS {out[-1]:7.1f} MB", flush=True)
    return out
