"""Riding (``BatchDecoder(ride=R)``): short prompts that arrive while rows decode are fed through the
decode step a token per step instead of a separate prefill. The rows get the tokens they get with a
prefill, the prompts are never sent to the model as a [1, T] prefill, they start after as many steps
as they had tokens left, and they end up in the prefix cache like prefilled prompts. Together: short
prompts waiting while nothing decodes share one [k, T] forward, then ride the rest."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit.decoder import BatchDecoder, PrefixCache, Row, prefill
from rwkvkit.sampling import GREEDY, Sampler, SamplingParams

V = 512


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[6, 7])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    from rwkvkit.testing import random_checkpoint

    path = tmp_path_factory.mktemp("ride") / f"m{request.param}.pth"
    random_checkpoint(request.param, n_layer=2, n_embd=64, vocab_size=V, head_size=32, seed=3, path=path)
    return rwkvkit.load(path)


def spy(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record the shape of every input ``model`` is called with (until the test ends)."""
    shapes: list[tuple[int, int]] = []
    inner = model.forward

    def forward(x, state=None, **kw):
        shapes.append(tuple(x.shape))
        return inner(x, state, **kw)

    monkeypatch.setattr(model, "forward", forward)
    return shapes


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41], [50]]
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, presence_penalty=0, frequency_penalty=0, seed=11)


def _rows(params: SamplingParams, n: int = 12, **kw) -> list[Row]:
    return [Row(prompt=list(p), sampler=Sampler(params, V), max_tokens=n, **kw) for p in PROMPTS]


def _serve(dec: BatchDecoder, rows: list[Row], arrive_every: int = 2) -> list[int]:
    """Add the first row, then one more every ``arrive_every`` steps while it decodes; step to the end.
    Returns, per row, the step at which it emitted its first token."""
    first = [-1] * len(rows)
    pending = list(enumerate(rows))
    step = 0
    while pending or len(dec):
        if pending and step % arrive_every == 0:
            dec.add(pending.pop(0)[1])
        dec.step()
        step += 1
        for i, r in enumerate(rows):
            if r.tokens and first[i] < 0:
                first[i] = step
    return first


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_riding_rows_get_the_tokens_a_prefill_gives(model, params: SamplingParams, monkeypatch) -> None:
    base = _rows(params)
    _serve(BatchDecoder(model, interleave=32), base)
    shapes = spy(model, monkeypatch)
    rode = _rows(params)
    _serve(BatchDecoder(model, interleave=32, ride=16), rode)
    for a, b in zip(base, rode):
        assert b.finish_reason == a.finish_reason == "length"
        assert b.tokens == a.tokens
    # only the first prompt (nothing was decoding) went through a prefill; the others rode [B, 1] steps
    assert [s for s in shapes if s[1] > 1] == [(1, len(PROMPTS[0]))]


def test_riders_start_after_their_prompt_and_keep_the_state(model) -> None:
    """A rider's first token comes after one step per prompt token; its final state equals the state
    of prefilling the prompt and feeding the same tokens."""
    rows = _rows(GREEDY, n=4, keep_state=True)
    dec = BatchDecoder(model, interleave=32, ride=16)
    dec.add(rows[0])
    dec.step()  # rows[0]: prefilled, then its first token
    assert len(rows[0].tokens) == 1
    dec.add(rows[2])  # 12 prompt tokens: rides
    for k in range(len(PROMPTS[2])):
        assert not rows[2].tokens, f"a token after {k} of {len(PROMPTS[2])} prompt steps"
        dec.step()
    dec.step()
    assert len(rows[2].tokens) == 1
    while len(dec):
        dec.step()
    logits, state = prefill(model, PROMPTS[2] + rows[2].tokens[:-1])
    ref_logits, ref_state = model(torch.tensor([[rows[2].tokens[-1]]]), state)
    for key, t in ref_state.tensors.items():
        torch.testing.assert_close(rows[2].state.tensors[key], t, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows[2].logits.reshape(-1), ref_logits.reshape(-1), rtol=1e-4, atol=1e-4)


def test_rides_only_what_is_short_and_plain(model, monkeypatch) -> None:
    """Prompts longer than ``ride`` are sliced until their tail is short enough, echo rows and rows
    with copies never ride; a finished rider's prompt is in the prefix cache."""
    cache = PrefixCache(16)
    shapes = spy(model, monkeypatch)
    dec = BatchDecoder(model, interleave=8, ride=4, cache=cache)
    lead = Row(prompt=[1, 2], sampler=Sampler(GREEDY, V), max_tokens=40)
    dec.add(lead)
    dec.step()
    long = Row(prompt=list(range(100, 118)), sampler=Sampler(GREEDY, V), max_tokens=2)  # 18 tokens
    dec.add(long)
    shapes.clear()
    while not long.done:
        dec.step()
    # two slices of 8, then its last 2 tokens ride
    assert [s for s in shapes if s[1] > 1] == [(1, 8), (1, 8)]
    echo = Row(prompt=[7, 8, 9], sampler=Sampler(GREEDY, V), max_tokens=2, echo=True, logprobs=0)
    two = Row(prompt=[4, 5], sampler=Sampler(GREEDY, V), max_tokens=2)
    dec.add(echo)
    dec.add(two, [Row(prompt=[4, 5], sampler=Sampler(GREEDY, V), max_tokens=2)])
    shapes.clear()
    while not (echo.done and two.done):
        dec.step()
    assert sorted(s for s in shapes if s[1] > 1) == [(1, 2), (1, 3)]  # both prefilled
    n, st, lg = cache.lookup(long.prompt)
    assert n == len(long.prompt)
    ref_logits, ref_state = prefill(model, long.prompt)
    torch.testing.assert_close(lg.reshape(-1), ref_logits, rtol=1e-4, atol=1e-4)
    for key, t in ref_state.tensors.items():
        torch.testing.assert_close(st.tensors[key], t, rtol=1e-4, atol=1e-5)


def test_a_cancelled_rider_leaves_and_the_others_go_on(model) -> None:
    rows = _rows(GREEDY, n=6)
    dec = BatchDecoder(model, interleave=32, ride=16)
    dec.add(rows[0])
    dec.step()
    dec.add(rows[2])
    dec.add(rows[1])
    dec.step()
    rows[2].cancelled = True
    while len(dec):
        dec.step()
    assert rows[2].finish_reason == "cancelled" and rows[2].tokens == []
    assert rows[0].finish_reason == rows[1].finish_reason == "length"
    alone = _rows(GREEDY, n=6)[1]
    d2 = BatchDecoder(model)
    d2.add(alone)
    while len(d2):
        d2.step()
    assert rows[1].tokens == alone.tokens


def test_ride_needs_positive_bounds(model) -> None:
    with pytest.raises(ValueError, match="ride"):
        BatchDecoder(model, interleave=8, ride=-1)


@pytest.mark.parametrize("flag", ["--ride-tokens", "--max-logprobs", "--burst-ms"])
def test_serve_refuses_a_negative_bound_naming_it(flag: str, capsys: pytest.CaptureFixture) -> None:
    from rwkvkit.serve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "unused.pth", flag, "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the error line (the usage lists every option)
    others = {"--ride-tokens", "--max-logprobs", "--burst-ms"} - {flag}
    assert f"{flag} must be >= 0" in err and not any(o in err for o in others)


BURST = [[5, 6, 7, 8, 9], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41], [50, 51, 52, 53]]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_burst_on_an_idle_decoder_is_prefilled_together(model, params: SamplingParams, monkeypatch) -> None:
    """Short prompts waiting while nothing decodes share one [k, T] forward (T: the shortest's length);
    the shortest start at once, the others ride the rest; every row gets the tokens it gets alone."""
    alone = [Row(prompt=list(p), sampler=Sampler(params, V), max_tokens=10) for p in BURST]
    for r in alone:
        dec = BatchDecoder(model, interleave=32)
        dec.add(r)
        while len(dec):
            dec.step()
    shapes = spy(model, monkeypatch)
    rows = [Row(prompt=list(p), sampler=Sampler(params, V), max_tokens=10) for p in BURST]
    cache = PrefixCache(16)
    dec = BatchDecoder(model, interleave=32, ride=16, cache=cache)
    for r in rows:
        dec.add(r)
    first, step = [-1] * len(rows), 0
    while len(dec):
        dec.step()
        step += 1
        first = [f if f >= 0 or not r.tokens else step for f, r in zip(first, rows)]
    shortest = min(map(len, BURST))
    assert shapes[0] == (len(BURST), shortest)  # one shared forward, before any decode step
    assert [s for s in shapes if s[1] > 1] == [(len(BURST), shortest)]  # no prefill of its own
    assert first == [1 + len(p) - shortest for p in BURST]
    for a, b in zip(alone, rows):
        assert b.finish_reason == a.finish_reason == "length"
        assert b.tokens == a.tokens
    for p in BURST:  # in the prefix cache, prefilled together or ridden
        assert cache.lookup(p)[0] == len(p)


def test_a_lone_prompt_or_long_ones_are_not_prefilled_together(model, monkeypatch) -> None:
    shapes = spy(model, monkeypatch)
    dec = BatchDecoder(model, interleave=32, ride=4)
    dec.add(Row(prompt=list(range(1, 9)), sampler=Sampler(GREEDY, V), max_tokens=2))  # 8 > ride
    dec.add(Row(prompt=[3, 4, 5], sampler=Sampler(GREEDY, V), max_tokens=2))
    dec.step()
    assert shapes[0] == (1, 8)  # the usual prefill: the long prompt is not in a group of one short one
