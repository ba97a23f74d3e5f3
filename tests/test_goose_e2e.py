"""RWKV-7 through the layers above the model, as v6 goes through them: ``rwkvkit generate`` / ``chat``
(saved conversations and state-tuned files), ``rwkvkit info``, and the server answering real requests
on a loopback port (one at a time and decoded together)."""

from __future__ import annotations

import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

import rwkvkit
from rwkvkit.generation import generate, generate_tokens, generate_tokens_batch, prefill
from rwkvkit.info import main as info_main
from rwkvkit.run_cli import ChatSession, generate_main, load_state_file
from rwkvkit.sampling import SamplingParams
from rwkvkit.serve import create_app, make_server
from rwkvkit.testing import random_checkpoint

GREEDY = SamplingParams(temperature=0)
OAI_GREEDY = SamplingParams(temperature=0, presence_penalty=0, frequency_penalty=0)


@pytest.fixture(scope="module")
def goose(tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("goose") / "goose.pth"
    random_checkpoint(7, n_layer=2, n_embd=64, vocab_size=65536, head_size=32, seed=5, path=path)
    yield path
    torch.set_num_threads(n)


def test_generate_command_and_saved_state(goose: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    st = tmp_path / "after.state"
    args = ["--model", str(goose), "--max-tokens", "8", "--temperature", "0"]
    assert generate_main([*args, "--prompt", "Once", "--save-state", str(st)]) == 0
    first = capsys.readouterr().out[:-1]
    assert generate_main([*args, "--prompt", " more", "--state", str(st)]) == 0
    second = capsys.readouterr().out[:-1]
    model, tok = rwkvkit.load(goose), rwkvkit.Tokenizer()
    g = generate(model, tok, "Once", max_tokens=8, sampling=SamplingParams(temperature=0))
    assert "".join(g) == first and len(g.tokens) == 8
    want = generate(model, tok, " more", max_tokens=8, sampling=SamplingParams(temperature=0), state=g.state)
    assert "".join(want) == second


def test_chat_continues_exactly_and_equals_the_transcript(goose: Path, tmp_path: Path) -> None:
    model, tok = rwkvkit.load(goose), rwkvkit.Tokenizer()
    a = ChatSession(model, tok, GREEDY, max_tokens=10)
    first = a.reply("Hi, who are you?", io.StringIO())
    a.save(str(tmp_path / "conv.state"))
    b = ChatSession(model, tok, GREEDY, max_tokens=10)
    b.load(str(tmp_path / "conv.state"))
    b.needs_separator = a.needs_separator
    assert a.reply("And then?", io.StringIO()) == b.reply("And then?", io.StringIO())
    prompt = "User: Hi, who are you?\n\nAssistant:"
    g = generate(model, tok, prompt, max_tokens=10, sampling=GREEDY, stop="\n\n")
    assert "".join(g).strip() == first
    c = ChatSession(model, tok, GREEDY, max_tokens=10)
    c.reply("Hi, who are you?", io.StringIO())
    _, st = prefill(model, tok.encode(prompt) + g.tokens)
    torch.testing.assert_close(c.state["wkv"], st["wkv"], atol=1e-4, rtol=1e-4)


def test_state_tuned_file_is_read_without_transpose(goose: Path, tmp_path: Path) -> None:
    """v7's time_state files store [value, key], the layout of its State (v5/v6 files are transposed)."""
    model = rwkvkit.load(goose)
    cfg = model.config
    sd = {
        f"blocks.{i}.att.time_state": torch.randn(cfg.n_head, cfg.head_size, cfg.head_size) for i in range(2)
    }
    torch.save(sd, tmp_path / "tuned.pth")
    st = load_state_file(str(tmp_path / "tuned.pth"), model)
    assert torch.equal(st["wkv"][1, 0], sd["blocks.1.att.time_state"])
    assert torch.equal(st.to_time_state()["blocks.0.att.time_state"], sd["blocks.0.att.time_state"])


def test_batched_generation_equals_one_at_a_time(goose: Path) -> None:
    model = rwkvkit.load(goose)
    prompts, budgets = [[300, 301, 302], list(range(1000, 1040)), [7]], [9, 5, 7]
    rows = generate_tokens_batch(model, prompts, max_tokens=budgets, sampling=GREEDY, keep_state=True)
    for p, n, row in zip(prompts, budgets, rows):
        solo = generate_tokens(model, p, max_tokens=n, sampling=GREEDY)
        assert list(solo) == row.tokens and len(row.tokens) == n
        torch.testing.assert_close(solo.state["wkv"], row.state["wkv"], atol=1e-4, rtol=1e-4)


def test_info_describes_goose(goose: Path, capsys: pytest.CaptureFixture) -> None:
    assert info_main([str(goose)]) == 0
    out = capsys.readouterr().out
    assert "Goose (RWKV-7): L2 C64 H2x32 F256 V65536" in out
    assert "_wkv7_fused" in out or "_wkv7_cpu" in out or "chunked" in out
    assert "_decode_v7" in out or "native step: the _decode_v7 extension is not built" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_goose_requests(goose: Path) -> None:
    model, tok = rwkvkit.load(goose), rwkvkit.Tokenizer()
    app = create_app(model, tok, model_name="goose", max_batch=8, max_tokens_limit=64, max_prompt_tokens=200)
    port = _free_port()
    srv = make_server(app, "127.0.0.1", port, log_level="warning")
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120
        )

        def direct(prompt: str, n: int, stop: str | tuple = ()) -> str:
            return generate(model, tok, prompt, max_tokens=n, sampling=OAI_GREEDY, stop=stop, stream=False)

        r = client.completions.create(
            model="goose", prompt="The capital of France is", max_tokens=10, temperature=0
        )
        assert r.choices[0].text == direct("The capital of France is", 10)
        msgs = [{"role": "user", "content": "Tell me a story"}]
        stream = client.chat.completions.create(
            model="goose", messages=msgs, max_tokens=12, temperature=0, stream=True
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in stream)
        assert text == direct("User: Tell me a story\n\nAssistant:", 12, stop="\n\n")
        prompts = [f"Story {i}: " + "once " * i for i in range(4)]

        def one(p: str) -> str:
            s = client.completions.create(model="goose", prompt=p, max_tokens=10, temperature=0, stream=True)
            return "".join(ch.choices[0].text for ch in s if ch.choices)

        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(one, prompts))
        assert got == [direct(p, 10) for p in prompts]
    finally:
        srv.should_exit = True
        th.join(timeout=30)
