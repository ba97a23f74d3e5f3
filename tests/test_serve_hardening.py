"""The server against a careful user and an attacker, on the real server (uvicorn on 127.0.0.1):
low temperatures, bad requests, oversize and slow bodies, half-open connections, browsers,
disconnected clients, long prompts arriving while others stream, and a model with its own vocabulary."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import torch

import rwkvkit
from rwkvkit.generation import generate
from rwkvkit.sampling import SamplingParams
from rwkvkit.serve import create_app
from rwkvkit.testing import random_checkpoint

from .serve_helpers import assert_error, free_port, running

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
GREEDY = SamplingParams(temperature=0, presence_penalty=0, frequency_penalty=0)
ORIGIN = "http://localhost:3000"
LIMIT = 3000


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("hard") / "tiny.pth"
    random_checkpoint(6, n_layer=2, n_embd=64, vocab_size=65536, head_size=32, seed=11, path=path)
    model, tok = rwkvkit.load(path), rwkvkit.Tokenizer()
    app = create_app(model, tok, model_name="tiny", api_key=KEY, max_batch=8, max_tokens_limit=LIMIT,
                     max_prompt_tokens=400, prefill_slice=8, cors_origins=[ORIGIN], body_timeout=2.0)  # fmt: skip
    with running(app, header_timeout=1.0) as url:
        yield {"url": url, "model": model, "tok": tok, "engine": app.state.engine}
    torch.set_num_threads(threads)


def _post(srv, body, path: str = "/v1/completions", headers: dict | None = None, **kw) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) or hasattr(body, "__next__") else json.dumps(body)
    return httpx.post(
        srv["url"] + path, content=content, headers={**AUTH, **(headers or {})}, timeout=60, **kw
    )


def _greedy(srv, prompt: str, n: int) -> str:
    return generate(srv["model"], srv["tok"], prompt, max_tokens=n, sampling=GREEDY, stream=False)


def _raw(srv) -> socket.socket:
    u = urlparse(srv["url"])
    s = socket.create_connection((u.hostname, u.port), timeout=10)
    return s


def _read_all(s: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes the connection."""
    s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    finally:
        s.close()
    return out


def _wait_idle(engine, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while engine.active and time.time() < deadline:
        time.sleep(0.05)


# ---- item 2: low temperatures ----------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.001, 0.01, 1e-6])
def test_low_temperature_is_near_greedy_not_garbage(srv, temperature) -> None:
    r = _post(srv, {"prompt": "Hello", "max_tokens": 8, "temperature": temperature, "seed": 1})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert "\ufffd" not in text and text == _greedy(srv, "Hello", 8)


# ---- item 4: every bad request is an OpenAI-shaped 4xx ----------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "seed": 2**64},
        {"prompt": "hi", "seed": -(2**63) - 1},
        "[" * 5000 + "]" * 5000,
        '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"prompt": "hi", "seed": ' + "9" * 5000 + "}",
        '{"prompt": "\\ud800 lone surrogate"}',
        {"prompt": "hi", "temperature": float("nan")},
        b'{"prompt": "\xff\xfe"}',
        {"prompt": "hi", "top_k": 2**70, "max_tokens": 1},
    ],
)
def test_bad_requests_are_shaped_4xx(srv, body) -> None:
    r = _post(srv, body)
    if r.status_code == 200:  # top_k beyond the vocabulary simply keeps every token
        assert body == {"prompt": "hi", "top_k": 2**70, "max_tokens": 1}
        return
    assert_error(r, 400)


def test_chat_with_lone_surrogate_and_big_seed(srv) -> None:
    body = '{"messages": [{"role": "user", "content": "\\udfff"}]}'
    assert_error(_post(srv, body, path="/v1/chat/completions"), 400)
    r = _post(srv, {"prompt": "hi", "max_tokens": 2, "seed": 2**64 - 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


# ---- item 5: bodies, connections, cancellation, interleaved prefill --------------------------------
def test_declared_oversize_body_is_refused_before_reading(srv) -> None:
    s = _raw(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 200000000\r\n\r\n{")  # fmt: skip
    t = time.time()
    reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 413") and b'"error"' in reply and time.time() - t < 5


def test_streamed_oversize_body_is_refused_while_streaming(srv) -> None:
    sent = {"n": 0}

    def chunks():
        for _ in range(64):  # 4 MB in 64 KB chunks, no Content-Length (chunked encoding)
            sent["n"] += 1
            yield b" " * 65536

    try:
        r = _post(srv, chunks())
    except httpx.HTTPError:  # the server may close before the client has finished sending
        return
    assert_error(r, 413)


def test_half_sent_headers_and_idle_connections_are_closed(srv) -> None:
    socks = []
    for i in range(40):
        s = _raw(srv)
        if i % 2:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        socks.append(s)
    time.sleep(1.0 + 1.5)  # the header deadline is 1 s here
    for s in socks:
        s.settimeout(3)
        try:
            assert s.recv(1024) == b""  # closed by the server
        except ConnectionResetError:
            pass
        s.close()
    assert httpx.get(srv["url"] + "/health").status_code == 200


def test_half_sent_body_gets_408(srv) -> None:
    s = _raw(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\":")  # fmt: skip
    reply = _read_all(s)
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive" in reply


def test_non_streaming_request_is_cancelled_when_its_client_leaves(srv) -> None:
    engine = srv["engine"]
    _wait_idle(engine)
    body = json.dumps({"prompt": "Keep going", "max_tokens": LIMIT, "temperature": 0}).encode()
    s = _raw(srv)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
    deadline = time.time() + 20
    while not engine.decoder.rows and time.time() < deadline:
        time.sleep(0.02)
    row = engine.decoder.rows[0]
    time.sleep(0.3)
    s.close()
    _wait_idle(engine, 10)
    assert engine.active == 0 and row.finish_reason == "cancelled" and len(row.tokens) < LIMIT


def test_long_prompt_is_interleaved_with_a_running_stream(srv) -> None:
    """While a 400-token prompt is prefilled (8 tokens per step here), the running stream keeps getting
    tokens; the old engine prefilled it in one go and the stream received nothing meanwhile."""
    _wait_idle(srv["engine"])
    got: list[float] = []
    started = threading.Event()

    def stream() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", srv["url"] + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    got.append(time.perf_counter())
                    if len(got) == 5:
                        started.set()

    th = threading.Thread(target=stream)
    th.start()
    assert started.wait(60)
    long_prompt = list(range(1000, 1400))
    t0 = time.perf_counter()
    r = _post(srv, {"prompt": long_prompt, "max_tokens": 1, "temperature": 0})
    t1 = time.perf_counter()
    th.join(120)
    assert r.status_code == 200
    during = [t for t in got if t0 < t < t1]
    assert len(during) >= 10, (len(during), len(got))


def test_engine_gives_memory_back_when_idle(srv, monkeypatch: pytest.MonkeyPatch) -> None:
    import rwkvkit.serve.engine as eng

    calls = []
    monkeypatch.setattr(eng, "trim_malloc", lambda: calls.append(1) or True)
    _post(srv, {"prompt": "hi", "max_tokens": 2})
    _wait_idle(srv["engine"])
    time.sleep(0.2)
    assert calls


def test_finished_requests_are_freed_without_the_cycle_collector(srv) -> None:
    """A request's row (its sampler's counts, its logits) is freed by reference counting when it ends;
    a row <-> job cycle used to keep every one until the cyclic collector ran, round after round."""
    import gc
    import weakref

    engine = srv["engine"]
    _wait_idle(engine)
    refs: list = []
    start = engine._start
    engine._start = lambda group: (refs.extend(weakref.ref(j.row) for j in group), start(group))[1]
    gc.disable()
    try:
        _post(srv, {"prompt": "one", "max_tokens": 3})
        _post(srv, {"prompt": "two", "max_tokens": 3, "stream": True})
        _post(srv, {"prompt": "", "max_tokens": 3})  # refused before it reaches the engine
        _post(srv, {"prompt": [5, 6], "max_tokens": 0})
        _wait_idle(engine)
        time.sleep(0.3)
        assert len(refs) == 3 and [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
        del engine._start


# ---- item 6: browsers and keys ----------------------------------------------------------------------
def test_browser_requests_are_refused(srv) -> None:
    assert_error(_post(srv, {"prompt": "hi"}, headers={"Content-Type": "text/plain"}), 415)
    assert_error(
        _post(srv, {"prompt": "hi"}, headers={"Content-Type": "application/x-www-form-urlencoded"}), 415
    )
    err = assert_error(_post(srv, {"prompt": "hi"}, headers={"Host": "evil.example:8000"}), 400)
    assert "Host" in err["message"]
    assert_error(
        _post(srv, {"prompt": "hi", "max_tokens": 1}, headers={"Origin": "http://evil.example"}), 403
    )
    assert_error(_post(srv, {"prompt": "hi", "max_tokens": 1}, headers={"Origin": "null"}), 403)
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert_error(httpx.get(srv["url"] + path), 404)


def test_allowed_cors_origin(srv) -> None:
    r = _post(srv, {"prompt": "hi", "max_tokens": 1}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    pre = httpx.options(srv["url"] + "/v1/completions", headers={"Origin": ORIGIN,
                        "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})  # fmt: skip
    assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    assert httpx.get(srv["url"] + "/health", headers={"Host": "localhost:1234"}).status_code == 200


def test_api_key_must_be_sendable(srv) -> None:
    with pytest.raises(ValueError, match="ASCII"):
        create_app(srv["model"], srv["tok"], api_key="clé-secrète")
    from rwkvkit.serve import main

    with pytest.raises(SystemExit):
        main(["--model", "x.pth", "--api-key", "ключ"])


# ---- item 3 and issue 12's flags: serve a model with its own vocabulary, int8 ------------------------
def test_serve_command_finds_the_demo_vocabulary(tmp_path: Path) -> None:
    demo = Path(rwkvkit.__file__).parent / "assets" / "demo-finch-L6-C256.pth"
    port = free_port()
    cmd = [sys.executable, "-m", "rwkvkit.cli", "serve", "--model", str(demo), "--port", str(port),
           "--quantize", "int8", "--dtype", "bf16", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "server did not start"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"prompt": "In the beginning", "max_tokens": 10,
                                                      "temperature": 0}, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        model = rwkvkit.load(demo, dtype=torch.bfloat16, quantize="int8")
        tok = rwkvkit.Tokenizer(demo.with_name(demo.stem + ".vocab.txt"))
        assert r.json()["choices"][0]["text"] == generate(model, tok, "In the beginning", max_tokens=10,
                                                          sampling=GREEDY, stream=False)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_health_shows_the_engine_only_with_the_key(srv) -> None:
    """/health answers everyone (liveness), but the load, timings and cache counters only the key holder."""
    open_ = httpx.get(srv["url"] + "/health")
    assert open_.status_code == 200 and open_.json() == {"status": "ok"}
    wrong = httpx.get(srv["url"] + "/health", headers={"Authorization": "Bearer nope"}).json()
    assert wrong == {"status": "ok"}
    full = httpx.get(srv["url"] + "/health", headers=AUTH).json()
    assert full["status"] == "ok" and "timings" in full and "cache" in full and "active" in full
