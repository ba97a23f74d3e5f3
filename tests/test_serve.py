"""The real server on a loopback port, driven by the official ``openai`` client and raw httpx."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import rwkvkit
from rwkvkit.generation import generate
from rwkvkit.sampling import SamplingParams
from rwkvkit.serve import chat_prompt, create_app, make_server
from rwkvkit.testing import random_checkpoint

KEY = "test-key-123"
LIMIT = 5000
HEADER_TIMEOUT = 1.0
OAI_GREEDY = SamplingParams(temperature=0, presence_penalty=0, frequency_penalty=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("serve") / "tiny.pth"
    random_checkpoint(6, n_layer=2, n_embd=64, vocab_size=65536, head_size=32, seed=3, path=path)
    model, tok = rwkvkit.load(path), rwkvkit.Tokenizer()
    app = create_app(model, tok, model_name="tiny", api_key=KEY, max_batch=16, max_tokens_limit=LIMIT,
                     max_prompt_tokens=300, max_queue=32)  # fmt: skip
    port = _free_port()
    srv = make_server(app, "127.0.0.1", port, header_timeout=HEADER_TIMEOUT, log_level="warning")
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "model": model, "tok": tok, "engine": app.state.engine}
    srv.should_exit = True
    th.join(timeout=30)
    torch.set_num_threads(threads)


def _client(server, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key or "none", max_retries=0, timeout=120)


def _direct(server, prompt: str, n: int, stop: str | list[str] = ()) -> str:
    return generate(server["model"], server["tok"], prompt, max_tokens=n, sampling=OAI_GREEDY, stop=stop,
                    stream=False)  # fmt: skip


def test_health_and_models(server) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}  # (without it, /health says only "ok")
    r = httpx.get(server["url"] + "/health", headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    before = r.json()["timings"]
    _client(server).completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    after = httpx.get(server["url"] + "/health", headers=auth).json()
    assert after["timings"]["rows"] - before["rows"] == 3 and after["timings"]["model_s"] > before["model_s"]
    assert after["active"] == 0 and set(after["cache"]) == {"entries", "bytes", "hits", "tokens_saved"}
    assert [m.id for m in _client(server).models.list().data] == ["tiny"]
    assert _client(server).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        _client(server).models.retrieve("gpt-4")
    assert httpx.get(server["url"] + "/v1/models/tiny").status_code == 401


def test_completion_matches_direct_generation(server) -> None:
    prompt = "The capital of France is"
    r = _client(server).completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == _direct(server, prompt, 12)
    assert r.choices[0].finish_reason in ("length", "stop")
    n_prompt = len(server["tok"].encode(prompt))
    assert r.usage.prompt_tokens == n_prompt and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens


def test_chat_uses_rwkv_format(server) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!\n\nHow are you?"}]
    r = _client(server).chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
    prompt = "System: Be brief.\n\nUser: Hi!\nHow are you?\n\nAssistant:"
    assert chat_prompt([(m["role"], m["content"]) for m in msgs]) == prompt
    assert r.choices[0].message.content == _direct(server, prompt, 20, stop="\n\n")
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"


def test_streaming_completion_and_chat(server) -> None:
    c = _client(server)
    prompt = "Once upon a time"
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=15, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == _direct(server, prompt, 15) and len(chunks) > 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}],
                                       max_tokens=15, temperature=0, stream=True)  # fmt: skip
    deltas = [ch.choices[0].delta.content or "" for ch in stream]
    want = _direct(server, "User: Tell me a story\n\nAssistant:", 15, stop="\n\n")
    assert "".join(deltas) == want


def test_sixteen_concurrent_streams(server) -> None:
    prompts = [f"Story number {i}: " + "once " * (i % 5) for i in range(16)]
    expected = [_direct(server, p, 24) for p in prompts]
    engine = server["engine"]
    engine.max_rows_seen = 0
    start = threading.Barrier(16)

    def one(p: str) -> str:
        c = _client(server)
        start.wait()
        s = c.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in s if ch.choices)

    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(one, prompts))
    assert got == expected
    assert engine.max_rows_seen >= 4  # the requests were decoded together, not one after another


def test_client_disconnect_mid_stream(server) -> None:
    engine = server["engine"]
    body = {"model": "tiny", "prompt": "Keep going", "max_tokens": LIMIT, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:  # fmt: skip
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in got)
    deadline = time.time() + 20
    while len(engine.decoder) and time.time() < deadline:  # the row leaves long before 5000 tokens
        time.sleep(0.05)
    assert len(engine.decoder) == 0
    r = _client(server).completions.create(model="tiny", prompt="Still alive?", max_tokens=3, temperature=0)
    assert r.choices[0].text == _direct(server, "Still alive?", 3)


def _post(server, body, key: str | None = KEY, path: str = "/v1/completions") -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(server["url"] + path, content=content, headers=headers, timeout=30)


def _assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    return err


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "hi", "max_tokens": ',  # malformed JSON
        "[1, 2, 3]",
        {"prompt": "hi", "max_tokens": "ten"},
        {"prompt": "hi", "temperature": "hot"},
        {"prompt": 42},
        {"prompt": "hi", "stream": "yes"},
        {"prompt": "hi", "max_tokens": -1},
        {"prompt": "hi", "top_p": 3},
        {"prompt": "hi", "n": 2000},
        {"prompt": "hi", "stop": [1, 2]},
        {"max_tokens": 5},
        {"prompt": [70000]},
    ],
)
def test_bad_completion_requests(server, body) -> None:
    _assert_error(_post(server, body), 400)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": "hello"},
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 5}]},
    ],
)
def test_bad_chat_requests(server, body) -> None:
    _assert_error(_post(server, body, path="/v1/chat/completions"), 400)


def test_oversize_requests(server) -> None:
    err = _assert_error(_post(server, {"prompt": "hi", "max_tokens": LIMIT + 1}), 400)
    assert err["param"] == "max_tokens"
    err = _assert_error(_post(server, {"prompt": "word " * 1000, "max_tokens": 1}), 400)
    assert "limit" in err["message"]
    _assert_error(_post(server, {"prompt": "x" * (2 << 20)}), 413)


def test_api_key_required(server) -> None:
    _assert_error(_post(server, {"prompt": "hi"}, key=None), 401)
    _assert_error(_post(server, {"prompt": "hi"}, key="wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert httpx.get(server["url"] + "/v1/models").status_code == 401
    _assert_error(
        httpx.get(server["url"] + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"}), 404
    )
