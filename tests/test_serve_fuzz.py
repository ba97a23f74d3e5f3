"""A bounded fuzz of the HTTP API against the real server on 127.0.0.1: random JSON shapes, types,
sizes, headers, methods and paths. Nothing may give a 5xx, every error must be OpenAI-shaped JSON,
and afterwards the server must still answer a greedy request exactly as before."""

from __future__ import annotations

import json
import random
import time

import httpx
import pytest
import torch

import rwkvkit
from rwkvkit.serve import create_app
from rwkvkit.testing import random_checkpoint

from .serve_helpers import assert_error, running

KEY = "fuzz-key"
N_REQUESTS = 400
TIME_BUDGET_S = 90.0
KEYS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
        "presence_penalty", "frequency_penalty", "penalty_decay", "stop", "stream", "stream_options", "n", "model",
        "role", "content", "type", "text", "logprobs", "echo", "user", "\u00e9\u00e8", ""]  # fmt: skip
STRINGS = ["", "hi", "User: hi\n\nAssistant:", "\u00e9\u4e2d\U0001f600", "\x00\x01", "\ud800", "\udfff x",
           "a" * 3000, "\n\n" * 50, "[DONE]", "<|endoftext|>", "\\u0000"]  # fmt: skip
NUMBERS = [
    0,
    1,
    -1,
    2,
    7,
    0.5,
    -0.0,
    1e-300,
    1e308,
    -1e308,
    2**31,
    2**63,
    2**64,
    -(2**64),
    10**100,
    3.7,
    1e-7,
]


def _value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if depth > 3 or roll < 0.35:
        return rng.choice(NUMBERS + STRINGS + [True, False, None])
    if roll < 0.55:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]
    if roll < 0.7:
        return [rng.randint(-5, 70000) for _ in range(rng.randint(0, 20))]  # token-id-like lists
    if roll < 0.85:
        return {
            "role": rng.choice(["user", "system", "assistant", "tool", "x"]),
            "content": _value(rng, depth + 1),
        }
    return {rng.choice(KEYS): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _plausible(rng: random.Random, key: str):
    """A value of about the right type for ``key`` (often valid, sometimes at or past its bounds)."""
    if key in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "penalty_decay"):
        return rng.choice([0, 0.0, 1e-9, 0.001, 0.5, 1, 1.0, 2.0, 2.5, -0.5, 1e-320])
    if key in ("top_k", "seed", "n", "max_completion_tokens"):
        return rng.choice([0, 1, 2, 40, 2**63, 2**64 - 1, 2**64, -(2**63), -1])
    if key == "stop":
        return rng.choice(["\n", ["a", "b"], [], ["x"] * 17, "", ["\n\n", "\ud800"]])
    if key == "stream_options":
        return rng.choice([{"include_usage": True}, {"include_usage": 1}, {}, None])
    if key in ("stream", "echo", "logprobs"):
        return rng.choice([True, False, 0, None])
    return _value(rng)


def _body(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.05:
        return bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))  # not JSON at all
    if kind < 0.1:
        d = rng.choice([10, 900, 3000, 20000])
        return (rng.choice(["[", '{"a":']) * d).encode()  # deep or unterminated nesting
    if kind < 0.15:
        return json.dumps(_value(rng)).encode()  # any JSON value at the top
    body: dict = {}
    wild = rng.random() < 0.5  # else a plausible request with one or two odd values
    good = ["hi", "Hello there", "\u00e9\u4e2d\U0001f600", "User: hi\n\nAssistant:", "1 2 3"]
    if rng.random() < 0.6:
        ids = [rng.randint(0, 70000 if wild else 65535) for _ in range(rng.randint(0 if wild else 1, 9))]
        body["prompt"] = rng.choice([rng.choice(STRINGS if wild else good), ids])
    else:
        roles = ["user", "system", "assistant", "developer"] + (["bot", "tool"] if wild else [])
        contents = [rng.choice(good), [{"type": "text", "text": "hi"}]] + (
            [None, 5, rng.choice(STRINGS)] if wild else []
        )
        body["messages"] = [{"role": rng.choice(roles), "content": rng.choice(contents)}
                            for _ in range(rng.randint(0 if wild else 1, 3))]  # fmt: skip
    body["max_tokens"] = rng.choice([0, 1, 3, 8, 8, 8, -1, 9, "4", None, 2**70])
    if rng.random() < 0.3:
        body["stream"] = True
    for _ in range(rng.randint(0, 5) if wild else rng.randint(0, 2)):
        key = rng.choice(KEYS)
        body[key] = _value(rng) if wild else _plausible(rng, key)
    text = json.dumps(body, allow_nan=True)  # NaN / Infinity literals: not strict JSON
    if rng.random() < 0.1:
        text = text[: rng.randint(0, len(text))]  # cut short
    return text.encode("utf-8", "surrogatepass")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("fuzz") / "tiny.pth"
    random_checkpoint(6, n_layer=1, n_embd=64, vocab_size=65536, head_size=32, seed=4, path=path)
    model, tok = rwkvkit.load(path), rwkvkit.Tokenizer()
    app = create_app(model, tok, api_key=KEY, max_batch=8, max_tokens_limit=8, max_prompt_tokens=64, max_queue=16,
                     default_max_tokens=4, body_timeout=5.0)  # fmt: skip
    with running(app, header_timeout=5.0) as url:
        yield url
    torch.set_num_threads(threads)


def _greedy(client: httpx.Client) -> tuple[str, str]:
    a = client.post(
        "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    )
    b = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                                                  "temperature": 0})  # fmt: skip
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    return a.json()["choices"][0]["text"], b.json()["choices"][0]["message"]["content"]


def test_fuzz_http_api(fuzz_server: str) -> None:
    rng = random.Random(20240406)
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=fuzz_server, headers=auth, timeout=60) as client:
        before = _greedy(client)
        start, statuses = time.time(), []
        for i in range(N_REQUESTS):
            if time.time() - start > TIME_BUDGET_S:
                break
            path = rng.choice(["/v1/completions"] * 10 + ["/v1/chat/completions"] * 8 +
                              ["/v1/models", "/health", "/v1/nothing", "/", "/v1/completions/x"])  # fmt: skip
            method = rng.choice(["POST"] * 20 + ["GET", "PUT", "DELETE", "OPTIONS"])
            headers = {"Content-Type": rng.choice(["application/json"] * 16 +
                                                  ["application/json; charset=utf-8", "text/plain", ""])}  # fmt: skip
            if rng.random() < 0.05:
                headers["Authorization"] = rng.choice(["", "Bearer", "Bearer wrong", "Basic eA=="])
            body = _body(rng)
            stream = b'"stream": true' in body
            req = client.build_request(method, path, content=body if method in ("POST", "PUT") else None,
                                       headers=headers)  # fmt: skip
            r = client.send(req, stream=stream)
            try:
                r.read()
            finally:
                r.close()
            statuses.append(r.status_code)
            assert r.status_code < 500, (i, method, path, body[:300], r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert_error(r)
            elif path in ("/v1/completions", "/v1/chat/completions") and r.status_code == 200:
                if r.headers["content-type"].startswith("text/event-stream"):
                    lines = [x for x in r.text.splitlines() if x.startswith("data: ")]
                    assert lines[-1] == "data: [DONE]"
                    for x in lines[:-1]:
                        chunk = json.loads(x[6:])
                        assert "choices" in chunk or "error" in chunk
                else:
                    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert len(statuses) >= 100, "the fuzz ran too few requests in its time budget"
        assert sum(s == 200 for s in statuses) >= 5 and sum(400 <= s < 500 for s in statuses) >= 50
        assert _greedy(client) == before
