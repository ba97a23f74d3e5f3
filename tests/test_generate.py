"""Generation: greedy parity with rwkv.utils.PIPELINE, batching, states, prefix cache, stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rwkvkit
from rwkvkit.generation import (
    BatchDecoder,
    PrefixCache,
    TextStream,
    generate,
    generate_batch,
    generate_tokens,
    generate_tokens_batch,
    penalty_weights,
    prefill,
)
from rwkvkit.sampling import GREEDY, SamplingParams
from rwkvkit.state import State
from rwkvkit.testing import random_checkpoint

V = 65536
PROMPT = "The quick brown fox jumps over the lazy dog. In 1999, the "


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> rwkvkit.Tokenizer:
    return rwkvkit.Tokenizer()


def _checkpoint(tmp: Path, version: int, seed: int = 1) -> Path:
    path = tmp / f"v{version}.pth"
    random_checkpoint(version, n_layer=2, n_embd=128, vocab_size=V, head_size=64, seed=seed, path=path)
    return path


@pytest.fixture(scope="module")
def model6(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    return rwkvkit.load(_checkpoint(tmp_path_factory.mktemp("gen"), 6))


@pytest.fixture(scope="module")
def ref_pipeline():
    """The reference PIPELINE, recording the tokens it samples (its generate loop keeps them private)."""
    from rwkv.utils import PIPELINE

    class Recording(PIPELINE):
        def sample_logits(self, *a, **k):
            t = super().sample_logits(*a, **k)
            self.tokens.append(t)
            return t

    return Recording(None, "rwkv_vocab_v20230424")  # the model is set per test


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_greedy_matches_reference_pipeline(tmp_path: Path, tok, ref_pipeline, version: int) -> None:
    """temperature 0 with the reference's default penalties: 64 tokens, token for token."""
    from rwkv.utils import PIPELINE_ARGS

    from tests.reference import load_reference

    path = _checkpoint(tmp_path, version)
    pipe = ref_pipeline
    pipe.model, pipe.tokens = load_reference(path), []
    pipe.generate(PROMPT * 3, token_count=64, args=PIPELINE_ARGS(temperature=0, chunk_len=32))
    model = rwkvkit.load(path)
    ours = generate_tokens(
        model,
        tok.encode(PROMPT * 3),
        max_tokens=64,
        sampling=SamplingParams(temperature=0),  # penalties 0.2 / 0.2 / decay 0.996, as PIPELINE_ARGS
        weights=penalty_weights(tok, V),
        chunk_len=32,
    )
    assert list(ours) == pipe.tokens
    assert len(pipe.tokens) == 64 and len(set(pipe.tokens)) > 8  # a real continuation, not one token


def test_chunked_prefill_equals_one_call(model6) -> None:
    ids = list(range(100, 180))
    a, sa = prefill(model6, ids, chunk_len=1000)
    b, sb = prefill(model6, ids, chunk_len=17)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(sa["wkv"], sb["wkv"], atol=2e-4, rtol=1e-4)


def test_batched_equals_per_prompt(model6, tok) -> None:
    prompts = [tok.encode(p) for p in ("Hello", PROMPT, "A much longer prompt, " * 9 + "end")]
    budgets = [12, 5, 9]
    params = [GREEDY, SamplingParams(seed=7, temperature=1.0, top_p=0.9), GREEDY.with_(presence_penalty=0.5)]
    rows = generate_tokens_batch(model6, prompts, max_tokens=budgets, sampling=params, keep_state=True)
    for p, n, sp, row in zip(prompts, budgets, params, rows):
        solo = generate_tokens(model6, p, max_tokens=n, sampling=sp)
        assert list(solo) == row.tokens
        assert row.finish_reason == "length" and len(row.tokens) == n
        torch.testing.assert_close(solo.state["wkv"], row.state["wkv"], atol=1e-4, rtol=1e-4)


def test_rows_finish_independently(model6) -> None:
    first = list(generate_tokens(model6, [300, 301, 302], max_tokens=3, sampling=GREEDY))
    rows = generate_tokens_batch(
        model6, [[300, 301, 302], [5, 6]], max_tokens=[10, 6], sampling=GREEDY, stop_tokens=[first[1]]
    )
    assert rows[0].tokens == first[:1] and rows[0].finish_reason == "stop"
    assert rows[1].finish_reason in ("stop", "length") and len(rows[1].tokens) <= 6
    solo = list(generate_tokens(model6, [5, 6], max_tokens=6, sampling=GREEDY, stop_tokens=[first[1]]))
    assert rows[1].tokens == solo


def test_cancelled_row_leaves_batch(model6) -> None:
    dec = BatchDecoder(model6)
    rows = generate_tokens_batch(model6, [[1, 2]], max_tokens=0)  # max_tokens 0 finishes at once
    assert rows[0].finish_reason == "length" and rows[0].tokens == []
    a = generate_tokens(model6, [7, 8], max_tokens=50, sampling=GREEDY).row
    b = generate_tokens(model6, [9], max_tokens=5, sampling=GREEDY).row
    dec.add(a)
    dec.add(b)
    dec.step()
    a.cancelled = True
    finished = dec.step()
    assert a in finished and a.finish_reason == "cancelled" and len(a.tokens) == 1
    while len(dec):
        dec.step()
    assert b.tokens == list(generate_tokens(model6, [9], max_tokens=5, sampling=GREEDY))


def test_saved_state_continues_exactly(model6, tok, tmp_path: Path) -> None:
    ids = tok.encode(PROMPT)
    g1 = generate_tokens(model6, ids, max_tokens=10, sampling=GREEDY)
    part1 = list(g1)
    g1.state.save(tmp_path / "conv.state")
    loaded = State.load(tmp_path / "conv.state")
    more = tok.encode(" and then")
    cont = list(generate_tokens(model6, more, max_tokens=12, sampling=GREEDY, state=loaded))
    direct = list(generate_tokens(model6, ids + part1 + more, max_tokens=12, sampling=GREEDY))
    in_memory = list(generate_tokens(model6, more, max_tokens=12, sampling=GREEDY, state=g1.state))
    assert cont == direct == in_memory
    assert torch.equal(loaded["wkv"], g1.state["wkv"])  # and the caller's state was not modified


def test_prefix_cache_reuses_shared_prefix(model6) -> None:
    cache = PrefixCache(4)
    base = list(range(1000, 1040))
    a = list(generate_tokens(model6, base, max_tokens=6, sampling=GREEDY, cache=cache))
    assert cache.hits == 0 and len(cache) == 1
    longer = base + [5, 6, 7]
    b = list(generate_tokens(model6, longer, max_tokens=6, sampling=GREEDY, cache=cache))
    assert cache.hits == 1 and cache.tokens_saved == len(base)
    assert b == list(generate_tokens(model6, longer, max_tokens=6, sampling=GREEDY))
    assert a == list(generate_tokens(model6, base, max_tokens=6, sampling=GREEDY, cache=cache))
    assert cache.hits == 2
    for i in range(6):
        cache.store([i], State.zeros(model6.config), torch.zeros(V))
    assert len(cache) == 4  # LRU bound


def test_time_state_changes_generation(model6) -> None:
    cfg = model6.config
    sd = {
        f"blocks.{i}.att.time_state": torch.randn(cfg.n_head, cfg.head_size, cfg.head_size)
        for i in range(cfg.n_layer)
    }
    st = State.from_time_state(sd, cfg)
    a = list(generate_tokens(model6, [11, 12], max_tokens=8, sampling=GREEDY, state=st))
    b = list(generate_tokens(model6, [11, 12], max_tokens=8, sampling=GREEDY))
    assert a != b


class _CharTokenizer:
    """One token per character (code point): enough to test text handling without a vocabulary."""

    def encode(self, s: str) -> list[int]:
        return [ord(c) for c in s]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_stop_prefixes() -> None:
    ts = TextStream(_CharTokenizer(), stop=["\n\nUser", "END"])
    out = [ts.feed(ord(c)) for c in "Hi.\n\nUs"]
    assert "".join(out) == "Hi." and not ts.stopped
    assert ts.feed(ord("x")) == "\n\nUsx"  # not a stop after all: released at once
    out = [ts.feed(ord(c)) for c in " ok EN"]
    assert "".join(out) == " ok " and ts.feed(ord("D")) == "" and ts.stopped
    assert ts.text == "Hi.\n\nUsx ok " and ts.finish() == ""
    ts2 = TextStream(_CharTokenizer(), stop=["STOP"])
    assert ts2.feed(ord("S")) == "" and ts2.finish() == "S" and ts2.text == "S"


def test_streamed_text_has_whole_characters(model6, tok) -> None:
    ts = TextStream(tok)
    assert [ts.feed(b + 1) for b in "日".encode()] == ["", "", "日"]  # ids 1..256 are single bytes
    gen = generate(
        model6, tok, "日本語のテキスト", max_tokens=40, sampling=SamplingParams(seed=3), stream=True
    )
    pieces = list(gen)
    assert "".join(pieces) == gen.text == tok.decode(gen.tokens)
    assert len(gen.tokens) == 40 and gen.finish_reason == "length"
    assert gen.prompt_tokens == len(tok.encode("日本語のテキスト"))


def test_stop_string_ends_generation(model6, tok) -> None:
    full = generate(model6, tok, PROMPT, max_tokens=30, sampling=GREEDY, stream=False, stop_tokens=())
    assert isinstance(full, str) and len(full) > 6
    stop = full[3:6]
    gen = generate(model6, tok, PROMPT, max_tokens=30, sampling=GREEDY, stop=stop, stop_tokens=())
    text = "".join(gen)
    assert text == full[: full.index(stop)] and gen.finish_reason == "stop"
    assert len(gen.tokens) < 30


def test_generate_batch_texts(model6, tok) -> None:
    prompts = ["One", "Two three four", PROMPT]
    texts = generate_batch(model6, tok, prompts, max_tokens=8, sampling=GREEDY)
    assert texts == [generate(model6, tok, p, max_tokens=8, sampling=GREEDY, stream=False) for p in prompts]


def test_bad_input_is_refused(model6) -> None:
    with pytest.raises(ValueError, match="outside"):
        list(generate_tokens(model6, [V + 5], max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        list(generate_tokens(model6, [], max_tokens=2))
    with pytest.raises(ValueError, match="batch size|shape"):
        list(generate_tokens(model6, [1], state=State.zeros(model6.config, 2)))


def test_interleaved_prefill_bounds_the_work_per_step(model6) -> None:
    """A long prompt arriving while a row decodes is fed at most ``interleave`` tokens per step, and
    every row still produces exactly what it would alone."""
    calls: list[tuple[int, int]] = []
    forward = model6.forward

    def spy(x, *a, **k):
        calls.append(tuple(torch.as_tensor(x).reshape(-1, torch.as_tensor(x).shape[-1]).shape))
        return forward(x, *a, **k)

    cache = PrefixCache(4)
    dec = BatchDecoder(model6, interleave=16, chunk_len=64, cache=cache)
    running = generate_tokens(model6, [7, 8, 9], max_tokens=30, sampling=GREEDY).row
    dec.add(running)
    dec.step()  # nothing else decodes yet: the short prompt is prefilled at once, then decoded
    long_prompt = list(range(2000, 2100))
    late = generate_tokens(model6, long_prompt, max_tokens=5, sampling=GREEDY).row
    gone = generate_tokens(model6, list(range(3000, 3050)), max_tokens=5, sampling=GREEDY).row
    dec.add(late)
    dec.add(gone)
    model6.forward = spy
    slices: list[int] = []
    try:
        steps = 0
        while len(dec):
            calls.clear()
            dec.step()
            steps += 1
            if steps == 2:
                gone.cancelled = True  # a client that leaves while its prompt is still being fed
            if not running.done:
                slices += [t for b, t in calls if b == 1 and t > 1]  # prompt slices while it decodes
    finally:
        model6.forward = forward
    assert slices and max(slices) == 16  # never more than the interleave per step
    assert gone.finish_reason == "cancelled" and gone.tokens == []
    assert running.tokens == list(generate_tokens(model6, [7, 8, 9], max_tokens=30, sampling=GREEDY))
    assert late.tokens == list(generate_tokens(model6, long_prompt, max_tokens=5, sampling=GREEDY))
    assert len(cache) == 2  # both completed prompts were cached, in pieces or not
    again = generate_tokens(model6, long_prompt, max_tokens=5, sampling=GREEDY).row
    dec.add(again)
    while len(dec):
        dec.step()
    assert again.tokens == late.tokens and cache.hits == 1


def test_interleaved_prefill_error_fails_one_row(model6) -> None:
    dec = BatchDecoder(model6, interleave=8)
    good = generate_tokens(model6, [5, 6], max_tokens=4, sampling=GREEDY).row
    bad = generate_tokens(model6, [5, 6, 7], max_tokens=4, sampling=GREEDY).row
    bad.prompt = [5, 6, V + 10]  # slipped past add's check: the model refuses it while prefilling
    dec.add(good)
    dec.prefilling.append(type(dec.prefilling[0])(bad))
    finished = []
    while len(dec):
        finished += dec.step()
    assert bad in finished and bad.finish_reason == "error" and "outside" in (bad.error or "")
    assert good.finish_reason == "length" and len(good.tokens) == 4


def test_interleave_budget_covers_several_short_prompts(model6) -> None:
    dec = BatchDecoder(model6, interleave=16)
    first = generate_tokens(model6, [4, 5], max_tokens=20, sampling=GREEDY).row
    dec.add(first)
    dec.step()
    short = [generate_tokens(model6, [10 + i, 11, 12], max_tokens=3, sampling=GREEDY).row for i in range(5)]
    for r in short:
        dec.add(r)
    dec.step()  # 16 tokens of budget: five 3-token prompts fit, and they decode in the same step
    assert len(dec.rows) == 6 and not dec.prefilling and all(len(r.tokens) == 1 for r in short)


def test_rwkvkit_generate_stays_the_function() -> None:
    """``rwkvkit.generate`` is the function however often it is used and whatever was imported before
    (its module is ``rwkvkit.generation``: a submodule of the same name would take the attribute)."""
    import importlib

    import rwkvkit

    importlib.import_module("rwkvkit.serve.app")  # imports the generation module first
    first = rwkvkit.generate
    assert callable(first) and first is rwkvkit.generate and first.__module__ == "rwkvkit.generation"


def test_a_generation_continues_exactly_from_its_state_and_logits(model6, tok) -> None:
    """``.state`` holds the last generated token; with ``.logits`` (the next-token logits that go with
    it) an empty prompt goes on exactly where the generation stopped (greedy: the same tokens as one
    longer generation); an empty prompt without them is refused with a message saying so."""
    kw = dict(sampling=GREEDY, stop_tokens=())
    whole = generate(model6, tok, "Once upon a time", max_tokens=20, **kw)
    assert whole.state is None and whole.logits is None  # not finished yet
    list(whole)
    first = generate(model6, tok, "Once upon a time", max_tokens=8, **kw)
    list(first)
    assert first.logits is not None and first.logits.shape == (V,)
    rest = generate(model6, tok, "", max_tokens=12, state=first.state, logits=first.logits, **kw)
    list(rest)
    assert first.tokens + rest.tokens == whole.tokens
    torch.testing.assert_close(rest.state["wkv"], whole.state["wkv"], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="only with the next-token logits"):
        generate(model6, tok, "", max_tokens=2, state=first.state, stream=False)
    with pytest.raises(ValueError, match="start logits must be"):
        generate(model6, tok, "", max_tokens=2, state=first.state, logits=first.logits[:5], stream=False)
