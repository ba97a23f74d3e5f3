"""Scoring through the real server (uvicorn on 127.0.0.1), read by the official ``openai`` client:
``logprobs``, ``echo``, token-id and multi-prompt ``prompt``, ``n > 1``, chat ``logprobs``, streams, the
state kept after a chat reply, and what is refused. Log-probabilities must equal offline scoring."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

import rwkvkit
from rwkvkit.generation import generate
from rwkvkit.sampling import SamplingParams
from rwkvkit.scoring import token_logprobs
from rwkvkit.serve import create_app
from rwkvkit.serve.protocol import chat_segments
from rwkvkit.testing import random_checkpoint

from .serve_helpers import assert_error, running

GREEDY = SamplingParams(temperature=0, presence_penalty=0, frequency_penalty=0)
MAX_QUEUE = 12


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("score") / "tiny.pth"
    random_checkpoint(6, n_layer=2, n_embd=64, vocab_size=65536, head_size=32, seed=7, path=path)
    model, tok = rwkvkit.load(path), rwkvkit.Tokenizer()
    app = create_app(model, tok, model_name="tiny", max_batch=8, max_queue=MAX_QUEUE, max_logprobs=5,
                     max_prompt_tokens=600, prefill_slice=16)  # fmt: skip
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        yield {"url": url, "model": model, "tok": tok, "engine": app.state.engine, "c": client}
    torch.set_num_threads(threads)


def _close(a: list, b: list, atol: float = 1e-4) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               atol=atol, rtol=0)  # fmt: skip


def _offline(srv, ids: list[int], top: int = 0):
    return token_logprobs(srv["model"], ids, top_n=top)


def _check_offsets(text: str, tokens: list[str], offsets: list[int]) -> None:
    """Each token's string starts at its offset in the text (tokens that are whole UTF-8)."""
    assert offsets == sorted(offsets) and (not offsets or offsets[0] == 0)
    for s, at in zip(tokens, offsets):
        if not s.startswith("bytes:"):
            assert text[at : at + len(s)] == s, (text, s, at)


def test_completion_logprobs_equal_offline_scoring(srv) -> None:
    tok, prompt = srv["tok"], "The capital of France is"
    r = srv["c"].completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, logprobs=5)
    ch = r.choices[0]
    ids = tok.encode(prompt)
    assert ch.text == generate(srv["model"], tok, prompt, max_tokens=8, sampling=GREEDY, stream=False)
    lp = ch.logprobs
    gen = tok.encode(ch.text)
    assert "".join(lp.tokens) == ch.text and len(lp.tokens) == r.usage.completion_tokens == len(gen) == 8
    ref = _offline(srv, ids + gen, 5)
    _close(lp.token_logprobs, ref.logprobs[len(ids) :])
    for mine, theirs, t, v in zip(lp.top_logprobs, ref.top[len(ids) :], lp.tokens, lp.token_logprobs):
        assert list(mine) == [tok.decode([i]) for i, _ in theirs]  # the top 5, most probable first
        _close(list(mine.values()), [x for _, x in theirs])
        assert mine[t] == v == max(mine.values())  # greedy: the chosen token is the most probable
    _check_offsets(ch.text, lp.tokens, lp.text_offset)


def test_echo_scores_token_id_prompts_like_lm_eval(srv) -> None:
    """lm-eval's OpenAI client: token-id prompts, ``echo``, ``logprobs: 1``, ``max_tokens`` 1 (it drops
    the generated token) or 0; the choices come back indexed in prompt order."""
    tok = srv["tok"]
    ctx = [tok.encode("Question: what is two plus two?\nAnswer:"), tok.encode("Paris is in")]
    conts = [tok.encode(" four"), tok.encode(" France, of course.")]
    prompts = [c + x for c, x in zip(ctx, conts)]
    for max_tokens in (0, 1):
        r = srv["c"].completions.create(model="tiny", prompt=prompts, max_tokens=max_tokens, temperature=0, echo=True,
                                        logprobs=1, seed=1234)  # fmt: skip
        assert [c.index for c in r.choices] == [0, 1]
        for c, ids, n_ctx in zip(r.choices, prompts, [len(x) for x in ctx]):
            lp = c.logprobs
            assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None
            assert lp.top_logprobs[0] is None and c.text.startswith(tok.decode(ids))
            ref = _offline(srv, ids, 1)
            _close(lp.token_logprobs[1 : len(ids)], ref.logprobs[1:])
            # what lm-eval computes from it: the continuation's sum and whether it is greedy
            cont = lp.token_logprobs[n_ctx : len(ids)]
            greedy = all(t == max(top.values()) for t, top in zip(cont, lp.top_logprobs[n_ctx : len(ids)]))
            assert abs(sum(cont) - sum(ref.logprobs[n_ctx:])) < 1e-3
            assert greedy == all(ref.greedy[n_ctx:])
            _check_offsets(c.text, lp.tokens, lp.text_offset)
        assert r.usage.prompt_tokens == sum(map(len, prompts))
        assert r.usage.completion_tokens == 2 * max_tokens


def test_several_prompts_and_n_choices(srv) -> None:
    """Strings and token-id lists as prompts, n choices each, indexed prompt_i * n + j; choice j samples
    with seed + j, so it is what one request with that seed gives."""
    tok, c = srv["tok"], srv["c"]
    kw = dict(model="tiny", max_tokens=6, temperature=1.0, top_p=0.9, seed=42)
    prompts = ["Once upon a time", "In the beginning"]
    r = c.completions.create(prompt=prompts, n=3, **kw)
    assert [ch.index for ch in r.choices] == list(range(6))
    for i, p in enumerate(prompts):
        for j in range(3):
            want = generate(srv["model"], tok, p, max_tokens=6, sampling=SamplingParams(
                temperature=1.0, top_p=0.9, presence_penalty=0, frequency_penalty=0, seed=42 + j), stream=False)  # fmt: skip
            assert r.choices[i * 3 + j].text == want
    assert len({ch.text for ch in r.choices[:3]}) > 1
    by_ids = c.completions.create(prompt=[tok.encode(p) for p in prompts], n=3, **kw)
    assert [ch.text for ch in by_ids.choices] == [ch.text for ch in r.choices]
    one = c.completions.create(prompt=tok.encode(prompts[1]), **kw)
    assert one.choices[0].text == r.choices[3].text
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == sum(len(tok.encode(ch.text)) for ch in r.choices)


def test_streams_carry_logprobs_chunk_by_chunk(srv) -> None:
    tok, c = srv["tok"], srv["c"]
    prompt = "A parrot 🦜 says"  # the parrot is three byte tokens: held back until whole
    kw = dict(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=2, echo=True, n=2)
    whole = c.completions.create(**kw)
    texts: dict[int, str] = {0: "", 1: ""}
    parts: dict[int, dict[str, list]] = {
        i: {"tokens": [], "token_logprobs": [], "text_offset": []} for i in (0, 1)
    }
    finish = {}
    for chunk in c.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
            if ch.logprobs is not None:
                for k in parts[ch.index]:
                    parts[ch.index][k] += getattr(ch.logprobs, k)
                if ch.text and not ch.finish_reason:
                    assert tok.decode([t for s in ch.logprobs.tokens for t in _ids(tok, s)]) == ch.text
    for i in (0, 1):
        w = whole.choices[i]
        assert texts[i] == w.text and finish[i] == w.finish_reason
        assert parts[i] == {k: getattr(w.logprobs, k) for k in parts[i]}
    ids = tok.encode(prompt)
    lp = whole.choices[0].logprobs
    at = [tok.token_bytes(i) for i in ids].index(b"\xf0\x9f")
    assert [tok.token_bytes(i) for i in ids[at : at + 3]] == [b"\xf0\x9f", b"\xa6", b"\x9c"]
    assert lp.tokens[at : at + 3] == ["bytes:\\xf0\\x9f", "bytes:\\xa6", "bytes:\\x9c"]  # OpenAI's convention
    assert lp.tokens[: len(ids)] == [tok.decode([i]) for i in ids[:at]] + lp.tokens[at : at + 3] + [
        tok.decode([i]) for i in ids[at + 3 :]
    ]
    _close(lp.token_logprobs[1 : len(ids)], _offline(srv, ids).logprobs[1:])
    _check_offsets(whole.choices[0].text, lp.tokens, lp.text_offset)


def test_ids_the_vocabulary_lacks_score_as_the_replacement_character(srv) -> None:
    """The model has 65536 logits, the World vocabulary 65529 entries: ids 65530..65535 can be prompted
    and sampled, and their log-probabilities are listed as the text shows them (U+FFFD), not a 500."""
    c, tok, ids = srv["c"], srv["tok"], [65535, 65530]
    with pytest.raises(ValueError):
        tok.token_bytes(65535)
    kw = dict(model="tiny", prompt=ids, max_tokens=2, temperature=0, logprobs=1, echo=True,
              logit_bias={"65533": 100})  # fmt: skip
    r = c.completions.create(**kw).choices[0]
    assert r.text == "\ufffd" * 4 and r.logprobs.tokens == ["\ufffd"] * 4
    assert r.logprobs.text_offset == [0, 1, 2, 3] and r.logprobs.token_logprobs[0] is None
    _close(r.logprobs.token_logprobs[1:2], _offline(srv, ids).logprobs[1:])
    streamed = [ch for chunk in c.completions.create(stream=True, **kw) for ch in chunk.choices]
    assert "".join(ch.text for ch in streamed) == r.text
    assert [t for ch in streamed if ch.logprobs for t in ch.logprobs.tokens] == r.logprobs.tokens
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                     temperature=0, logprobs=True, top_logprobs=1, logit_bias={"65533": 100})  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert [(e.token, e.bytes) for e in content] == [("\ufffd", list("\ufffd".encode()))] * 2


def test_a_stream_that_fails_after_its_200_ends_with_an_error_event(srv, monkeypatch, capsys) -> None:
    """Once a stream's 200 is sent, an internal error cannot become a status: the client gets an
    OpenAI-shaped error event and the end of the stream, not a connection cut mid-body."""
    from rwkvkit.serve.logprobs import TokenStrings

    def boom(self, token: int):
        raise RuntimeError("boom")

    monkeypatch.setattr(TokenStrings, "get", boom)
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "logprobs": 1, "stream": True}
    with httpx.stream("POST", srv["url"] + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    errors = [json.loads(e)["error"] for e in events[:-1] if "error" in json.loads(e)]
    assert errors == [
        {"message": "internal error: RuntimeError", "type": "server_error", "param": None, "code": None}
    ]
    assert "RuntimeError: boom" in capsys.readouterr().err  # and the traceback is in the server's log


def test_text_offsets_around_half_characters(srv) -> None:
    """A byte token left half a character that the next token does not finish: the text shows U+FFFD
    for it, and the next token's offset is after that character (also across the echo's end)."""
    tok, c = srv["tok"], srv["c"]
    a, half, b = tok.encode("A"), tok.encode(b"\xe7"), tok.encode("B")
    assert len(a) == len(half) == len(b) == 1 and tok.token_bytes(half[0]) == b"\xe7"
    kw = dict(model="tiny", prompt=a + half + b + half, max_tokens=2, temperature=0, logprobs=0, echo=True,
              logit_bias={str(b[0]): 100})  # fmt: skip
    r = c.completions.create(**kw).choices[0]
    assert r.text == "A\ufffdB\ufffdBB"
    assert r.logprobs.tokens == ["A", "bytes:\\xe7", "B", "bytes:\\xe7", "B", "B"]
    assert r.logprobs.text_offset == [0, 1, 2, 3, 4, 5]
    r = c.completions.create(**{**kw, "echo": False, "prompt": a}).choices[0]
    assert r.logprobs.text_offset == [0, 1]


def test_null_means_the_default(srv) -> None:
    """OpenAI's API takes null for any optional field (some clients send them all)."""
    nulls = dict.fromkeys(["temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "seed",
                           "stop", "logit_bias", "stream_options", "top_k", "penalty_decay"])  # fmt: skip
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, **nulls, "echo": None, "logprobs": None}
    r = httpx.post(srv["url"] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **nulls,
            "logprobs": None, "top_logprobs": None}  # fmt: skip
    r = httpx.post(srv["url"] + "/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None
    assert_error(httpx.post(srv["url"] + "/v1/completions", json={"prompt": None}, timeout=60), 400)


def _ids(tok, s: str) -> list[int]:
    if s.startswith("bytes:"):
        return tok.encode(bytes.fromhex(s[6:].replace("\\x", "")))
    return tok.encode(s)


def test_chat_logprobs(srv) -> None:
    tok, c = srv["tok"], srv["c"]
    msgs = [{"role": "user", "content": "Name a colour."}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                  top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content
    ids = [t for s in chat_segments([("user", "Name a colour.")]) for t in tok.encode(s)]
    gen = [t for e in content for t in tok.encode(bytes(e.bytes))]
    assert len(content) == len(gen) == r.usage.completion_tokens
    assert bytes(b for e in content for b in e.bytes).decode().startswith(r.choices[0].message.content)
    ref = _offline(srv, ids + gen, 3)
    _close([e.logprob for e in content], ref.logprobs[len(ids) :])
    for e, theirs in zip(content, ref.top[len(ids) :]):
        assert [t.token for t in e.top_logprobs] == [tok.decode([i]) for i, _ in theirs]
        assert [t.bytes for t in e.top_logprobs] == [list(tok.token_bytes(i)) for i, _ in theirs]
    streamed = [e for ch in c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                      logprobs=True, top_logprobs=3, stream=True)
                for choice in ch.choices if choice.logprobs is not None for e in choice.logprobs.content]  # fmt: skip
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_turn_two_starts_from_the_state_after_turn_one(srv) -> None:
    """The state after a chat reply is kept: turn 2's prompt (turn 1's prompt + the reply + the new
    message) prefills only the new message, and answers as the whole prompt does from scratch."""
    tok, c = srv["tok"], srv["c"]
    hello = tok.encode(" Hello")[0]
    msgs = [
        {"role": "system", "content": "You are a parrot. " * 20},
        {"role": "user", "content": "Say hello."},
    ]
    r1 = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0,
                                   logit_bias={str(hello): 100})  # a reply the tokenizer gives back as it came  # fmt: skip
    assert r1.choices[0].message.content == " Hello" * 6 and r1.usage.prompt_tokens_details.cached_tokens == 0
    msgs += [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "Again?"},
    ]
    r2 = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens + 6
    assert r2.usage.prompt_tokens - r2.usage.prompt_tokens_details.cached_tokens == len(
        tok.encode("\n\nUser: Again?\n\nAssistant:")
    )
    prompt = "".join(chat_segments([(m["role"], m["content"]) for m in msgs]))
    assert r2.choices[0].message.content == generate(srv["model"], tok, prompt, max_tokens=8, sampling=GREEDY,
                                                     stop="\n\n", stream=False)  # fmt: skip


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "suffix": " end"}, "suffix"),
        ({"prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"prompt": "hi", "n": 9}, "n"),
        ({"prompt": ["a", "b", "c", "d", "e"], "n": 3}, "prompt"),
        ({"prompt": [], "max_tokens": 1}, "prompt"),
        ({"prompt": [[1, 2], []], "max_tokens": 1}, "prompt"),
        ({"prompt": [[1, 2], [70000]], "max_tokens": 1}, "prompt"),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"5": 1, " 5": -1}}, "logit_bias"),  # one token, two keys
        ({"prompt": "hi", "logit_bias": {"05": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"\u0665": 1}}, "logit_bias"),  # ARABIC-INDIC DIGIT FIVE
        ({"prompt": "hi", "logit_bias": {"65536": 1}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"prompt": "hi", "logprobs": True}, "logprobs"),
        ({"prompt": [1, "a"]}, "prompt"),
    ],
)
def test_what_is_refused_says_so(srv, body, param) -> None:
    err = assert_error(httpx.post(srv["url"] + "/v1/completions", json=body, timeout=30), 400)
    assert param in (err["param"] or "") + err["message"]


def test_chat_refusals(srv) -> None:
    url = srv["url"] + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    err = assert_error(httpx.post(url, json={"messages": msgs, "top_logprobs": 2}, timeout=30), 400)
    assert "logprobs" in err["message"]
    err = assert_error(
        httpx.post(url, json={"messages": msgs, "logprobs": True, "top_logprobs": 6}, timeout=30), 400
    )
    assert "at most 5" in err["message"]
    assert_error(httpx.post(url, json={"messages": msgs, "logprobs": 3}, timeout=30), 400)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    err = assert_error(httpx.post(url, json={"messages": parts}, timeout=30), 400)
    assert err["param"] == "messages[0].content" and "'image_url' are not supported" in err["message"]
    parts = [{"role": "user", "content": [{"type": "text"}]}]
    assert (
        "needs its 'text'"
        in assert_error(httpx.post(url, json={"messages": parts}, timeout=30), 400)["message"]
    )
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert httpx.post(url, json={"messages": parts, "max_tokens": 1}, timeout=30).status_code == 200


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_chat_features_not_served_are_refused_not_ignored(srv, extra, param) -> None:
    """Function calling, JSON output and audio get a 400 that names them (the client would otherwise
    read plain text as if its request had been honoured); their neutral values are accepted."""
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        srv["c"].chat.completions.create(model="tiny", messages=msgs, max_tokens=2, **extra)
    body = e.value.body  # the error object of the response, as the client reads it
    assert body["param"] == param and ("not supported" in body["message"] or "only text" in body["message"])
    ok = srv["c"].chat.completions.create(model="tiny", messages=msgs, max_tokens=2, tool_choice="none",
                                          response_format={"type": "text"}, modalities=["text"])  # fmt: skip
    assert ok.choices[0].finish_reason in ("length", "stop")
