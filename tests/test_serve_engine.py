"""What the server's engine is made of, without HTTP: batched sampling, the decoder's scoring (logprobs,
echo), one prefill for n choices, the state kept after a reply, the prefix cache's memory bound, and
the chat template's token boundaries."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit.decoder import BatchDecoder, PrefixCache, Row, prefill
from rwkvkit.sampling import GREEDY, Sampler, SamplingParams, make_generator, sample_logits, sample_rows
from rwkvkit.scoring import token_logprobs
from rwkvkit.serve.protocol import chat_prompt, chat_segments
from rwkvkit.state import State
from rwkvkit.testing import random_checkpoint

V = 65536


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    path = tmp_path_factory.mktemp("eng") / "m.pth"
    random_checkpoint(6, n_layer=2, n_embd=64, vocab_size=V, head_size=32, seed=5, path=path)
    return rwkvkit.load(path)


@pytest.fixture(scope="module")
def tok() -> rwkvkit.Tokenizer:
    return rwkvkit.Tokenizer()


def _row(prompt: list[int], params: SamplingParams = GREEDY, n: int = 6, **kw) -> Row:
    return Row(prompt=list(prompt), sampler=Sampler(params, V), max_tokens=n, **kw)


def _run(dec: BatchDecoder) -> None:
    while len(dec):
        dec.step()


# ---- batched sampling -------------------------------------------------------------------------------
PARAMS = [
    GREEDY,
    SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=0, frequency_penalty=0, seed=1),
    SamplingParams(temperature=1.3, top_p=1.0, top_k=40, presence_penalty=0, frequency_penalty=0, seed=2),
    SamplingParams(temperature=1.0, top_p=0.5, presence_penalty=0, frequency_penalty=0, seed=3),
    SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=0, frequency_penalty=0, seed=4),
    SamplingParams(temperature=1.0, top_p=0.85, seed=5),  # the reference's penalties
    SamplingParams(temperature=0.0, presence_penalty=0.5, token_ban=(7, 8), seed=6),
    SamplingParams(temperature=2.0, top_p=0.99, top_k=3, token_ban=(1,), seed=7),
]


def test_batched_sampling_draws_what_each_row_draws_alone() -> None:
    """``sample_rows`` groups rows with equal filters into [b, V] operations; every row still gets the
    token its own sampler draws alone, and, without penalties, what the one-row pure functions draw."""
    g = torch.Generator().manual_seed(0)
    together = [Sampler(p, V) for p in PARAMS]
    alone = [Sampler(p, V) for p in PARAMS]
    pure = [make_generator(p.seed) for p in PARAMS]
    for step in range(8):
        logits = torch.randn(len(PARAMS), V, generator=g) * (1 + step)
        logits[2, 5] = float("nan")  # non-finite rows take the one-row path for that row only
        got = sample_rows(logits, together)
        assert got == [s(logits[i]) for i, s in enumerate(alone)]
        for i, p in enumerate(PARAMS):
            if not (p.presence_penalty or p.frequency_penalty):
                assert sample_logits(logits[i], p, pure[i]) == got[i]
            assert got[i] not in p.token_ban
        assert together[5].counts.sum() > 0 and torch.equal(together[5].counts, alone[5].counts)


# ---- the decoder's scoring ----------------------------------------------------------------------------
@pytest.mark.parametrize("interleave", [0, 5])
def test_decoder_logprobs_equal_offline_scoring(model, interleave: int) -> None:
    """Echoed prompt and emitted tokens: the log-probabilities and top-3 the decoder records equal
    ``scoring.token_logprobs`` of the same tokens (the prompt slices and the batch do not matter)."""
    prompts = [list(range(300, 317)), [5, 6, 7], list(range(900, 940))]
    params = [GREEDY, PARAMS[1], PARAMS[3]]
    dec = BatchDecoder(model, interleave=interleave, cache=PrefixCache(4))
    rows = [_row(p, params[i], 7, logprobs=3, echo=i != 1) for i, p in enumerate(prompts)]
    for r in rows:
        dec.add(r)
    _run(dec)
    for r in rows:
        ref = token_logprobs(model, r.prompt + r.tokens, top_n=3)
        n = len(r.prompt)
        assert len(r.tokens) == 7 and len(r.token_logprobs) == 7 == len(r.top_logprobs)
        torch.testing.assert_close(
            torch.tensor(r.token_logprobs), torch.tensor(ref.logprobs[n:]), atol=1e-4, rtol=0
        )
        for mine, theirs in zip(r.top_logprobs, ref.top[n:]):
            assert [t for t, _ in mine] == [t for t, _ in theirs]
            torch.testing.assert_close(torch.tensor([v for _, v in mine]), torch.tensor([v for _, v in theirs]),
                                       atol=1e-4, rtol=0)  # fmt: skip
        if r.echo:
            assert r.prompt_logprobs[0] is None and r.prompt_top_logprobs[0] is None
            torch.testing.assert_close(torch.tensor(r.prompt_logprobs[1:]), torch.tensor(ref.logprobs[1:n]),
                                       atol=1e-4, rtol=0)  # fmt: skip
            assert [[t for t, _ in x] for x in r.prompt_top_logprobs[1:]] == [
                [t for t, _ in x] for x in ref.top[1:n]
            ]
        else:
            assert r.prompt_logprobs is None
        if params[prompts.index(r.prompt)].greedy:
            assert all(top[0][0] == t for top, t in zip(r.top_logprobs, r.tokens))


def test_logprobs_ignore_bias_and_filters(model) -> None:
    """Log-probabilities are the model's distribution: a logit bias that forces a token changes what is
    drawn, not the logprob reported for it."""
    forced = 4242
    r = _row([10, 11, 12], PARAMS[1], 4, logprobs=0, logit_bias={forced: 100.0})
    dec = BatchDecoder(model)
    dec.add(r)
    _run(dec)
    assert r.tokens == [forced] * 4 and r.top_logprobs == [[]] * 4
    ref = token_logprobs(model, r.prompt + r.tokens)
    torch.testing.assert_close(
        torch.tensor(r.token_logprobs), torch.tensor(ref.logprobs[3:]), atol=1e-4, rtol=0
    )
    assert max(r.token_logprobs) < -1.0  # a random model does not favour it


# ---- n choices: one prefill ---------------------------------------------------------------------------
@pytest.mark.parametrize("interleave", [0, 8])
def test_copies_share_one_prefill_and_decode_alone(model, interleave: int) -> None:
    prompt = list(range(2000, 2030))
    seeds = [11, 12, 13]
    mk = lambda s: _row(prompt, PARAMS[1].with_(seed=s), 6, logprobs=1, echo=True)  # noqa: E731
    rows = [mk(s) for s in seeds]
    calls: list[int] = []
    forward = model.forward

    def spy(x, *a, **k):
        calls.append(torch.as_tensor(x).shape[-1])
        return forward(x, *a, **k)

    dec = BatchDecoder(model, interleave=interleave)
    model.forward = spy
    try:
        dec.add(rows[0], rows[1:])
        assert len(dec) == 3
        _run(dec)
    finally:
        model.forward = forward
    assert sum(t for t in calls if t > 1) == len(prompt)  # the prompt, once for the three rows
    for s, r in zip(seeds, rows):
        solo = mk(s)
        d = BatchDecoder(model)
        d.add(solo)
        _run(d)
        assert r.tokens == solo.tokens and r.prompt_logprobs == rows[0].prompt_logprobs
    assert len({tuple(r.tokens) for r in rows}) > 1  # the seeds differ, so do the choices
    with pytest.raises(ValueError, match="copies"):
        BatchDecoder(model).add(_row(prompt), [_row(prompt[:-1])])


# ---- the state after a reply, and the cache's bounds ---------------------------------------------------
def test_cache_end_keeps_the_state_after_the_reply(model) -> None:
    cache = PrefixCache(8)
    dec = BatchDecoder(model, cache=cache, interleave=16)
    stop = _row([40, 41, 42], GREEDY, 50)
    first = BatchDecoder(model)
    first.add(stop)
    first.step()
    r = _row(list(range(100, 140)), GREEDY, 5, cache_end=True)
    s = _row([40, 41, 42], GREEDY, 50, cache_end=True, stop_tokens=frozenset({stop.tokens[0]}))
    for x in (r, s):
        dec.add(x)
    _run(dec)
    assert r.finish_reason == "length" and s.finish_reason == "stop" and s.tokens == []
    assert r.state is None  # the row itself keeps nothing (no keep_state)
    for x in (r, s):
        seq = x.prompt + x.tokens
        n, state, logits = cache.lookup(seq + [7, 8])
        assert n == len(seq)
        want_logits, want = prefill(model, seq)
        torch.testing.assert_close(state["wkv"], want["wkv"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
    nxt = _row(r.prompt + r.tokens + [7, 8], GREEDY, 5)
    dec.add(nxt)
    _run(dec)
    assert nxt.cached_tokens == len(r.prompt) + 5
    alone = _row(nxt.prompt, GREEDY, 5)
    d = BatchDecoder(model)
    d.add(alone)
    _run(d)
    assert nxt.tokens == alone.tokens


def test_prefix_cache_is_bounded_in_bytes(model) -> None:
    st, lg = State.zeros(model.config), torch.zeros(V)
    size = sum(t.numel() * t.element_size() for t in st.tensors.values()) + V * 4
    cache = PrefixCache(100, max_bytes=3 * size + 10)
    for i in range(6):
        cache.store([i, i], st, lg)
        assert cache.nbytes <= 3 * size + 10
    assert len(cache) == 3 and cache.lookup([5, 5, 1])[0] == 2 and cache.lookup([1, 1])[0] == 0
    PrefixCache(1, max_bytes=size - 1).store([1], st, lg)  # too big for the cache: not stored, no error
    small = PrefixCache(1, max_bytes=size - 1)
    small.store([1], st, lg)
    assert len(small) == 0 and small.nbytes == 0
    with pytest.raises(ValueError):
        PrefixCache(4, max_bytes=0)


# ---- the chat template's token boundaries ---------------------------------------------------------------
CHATS = [
    [("user", "hi")],
    [
        ("system", "Be brief."),
        ("user", "Hi!\n\nHow are you?"),
        ("assistant", " Fine, thanks.  "),
        ("user", "ok"),
    ],
    [
        ("user", "Ünïcödé 漢字 🦜 and: colons: here"),
        ("assistant", "A list:\n- one\n- two\n\n\nend."),
        ("user", "x"),
    ],
    [("user", "  spaces   "), ("assistant", ""), ("user", "tabs\t\tand\r\nnewlines")],
]


@pytest.mark.parametrize("messages", CHATS)
def test_chat_segments_tokenize_as_the_whole_prompt(tok, messages) -> None:
    """With the World vocabulary no token crosses "Role:" | " text\\n\\n" | "Role:": the server's
    segment-by-segment tokenization equals the whole prompt's, and each earlier turn's prompt + the
    reply (as the model emits it, ending in "\\n\\n") is a token prefix of the next turn's prompt."""
    segs = chat_segments(messages)
    joined = [t for s in segs for t in tok.encode(s)]
    assert joined == tok.encode(chat_prompt(messages)) == tok.encode("".join(segs))
    for k, (role, text) in enumerate(messages):
        if role != "assistant":
            continue
        before = [t for s in chat_segments(messages[:k]) for t in tok.encode(s)]
        reply = tok.encode(segs[2 * k + 1])  # " text\n\n": the reply's tokens through its stop
        assert joined[: len(before) + len(reply)] == before + reply
        assert reply[-1] == tok.encode("\n\n")[0] or text.strip() == ""


# ---- the decoder's own timings (what /health reports, what bench serve --measure profile reads) ---------
def test_timings_count_steps_rows_and_parts(model) -> None:
    dec = BatchDecoder(model, interleave=4)
    rows = [_row(list(range(300, 310)), GREEDY, 5), _row(list(range(400, 403)), PARAMS[1], 7)]
    for r in rows:
        dec.add(r)
    _run(dec)
    tm = dec.timings
    assert tm["rows"] == sum(len(r.tokens) for r in rows) == 12  # one row-step per token emitted
    assert 7 <= tm["steps"] < 12  # the rows share steps
    parts = sum(tm[k] for k in ("prefill_s", "sample_s", "score_s", "emit_s", "model_s"))
    assert tm["prefill_s"] > 0 and tm["model_s"] > 0 and tm["sample_s"] > 0
    assert parts <= tm["step_s"] + 1e-6
