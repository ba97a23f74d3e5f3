"""Sampling filters alone, against rwkv.utils.PIPELINE.sample_logits's distribution, and at extremes
(temperatures down to subnormal floats, infinite and NaN logits, every filter and penalty at its bounds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkvkit.sampling import (
    Sampler,
    SamplingParams,
    apply_temperature,
    ban_tokens,
    log_probs,
    penalize,
    probabilities,
    sample_logits,
    sample_rows,
    top_k_filter,
    top_p_filter,
)


def _logits(V: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


def test_params_validate() -> None:
    for bad in (
        dict(temperature=-1),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(penalty_decay=2.0),
        dict(top_k=1.5),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    for bad, says in ((dict(seed="x"), "seed must be an integer"), (dict(temperature="1"), "temperature must be a"),
                      (dict(top_p=None), "top_p must be a number"), (dict(seed=True), "seed must be")):  # fmt: skip
        with pytest.raises(ValueError, match=says):
            SamplingParams(**bad)
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=np.float32(0.5), seed=np.int64(3)).seed == 3


def _kept(logp: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(logp)


def test_top_p_keeps_smallest_nucleus() -> None:
    logp = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    assert torch.equal(_kept(top_p_filter(logp, 0.7)), torch.tensor([False, True, True, False]))
    assert torch.equal(_kept(top_p_filter(logp, 0.79)), torch.tensor([False, True, True, False]))
    assert torch.equal(_kept(top_p_filter(logp, 0.81)), torch.tensor([False, True, True, True]))
    assert torch.equal(_kept(top_p_filter(logp, 0.0)), torch.tensor([False, True, False, False]))
    assert torch.equal(top_p_filter(logp, 1.0), logp)


def test_top_p_wide_nucleus() -> None:
    probs = torch.full((5000,), 1 / 5000)
    probs[0] = 0.0
    kept = top_p_filter(torch.log(probs / probs.sum()), 0.9)
    assert int(_kept(kept).sum()) == 4999  # all equal: every one reaches the cutoff


def test_top_k_and_temperature() -> None:
    logp = log_probs(_logits(100))
    kept = top_k_filter(logp, 5)
    assert int(_kept(kept).sum()) == 5
    assert set(torch.nonzero(_kept(kept)).flatten().tolist()) == set(torch.topk(logp, 5).indices.tolist())
    assert torch.equal(top_k_filter(logp, 0), logp)
    lg = _logits(50)
    t = torch.exp(apply_temperature(log_probs(lg), 0.5))
    assert torch.allclose(t.float(), torch.softmax(lg / 0.5, 0), atol=1e-6)


def test_low_temperatures_sample_the_best_token_not_the_last() -> None:
    """The old ``probs ** (1/T)`` underflowed to 0/0 for T below ~0.05 and always returned id V-1."""
    lg = _logits(65536, seed=3)
    best = int(torch.argmax(lg))
    lg[best] += 1.0  # a clear winner (the second is 1 nat or more behind)
    for T in (0.04, 0.01, 1e-3, 1e-6, 1e-30, 5e-324):
        p = SamplingParams(temperature=T, top_p=1.0, seed=0)
        probs = probabilities(lg, p)
        assert not torch.isnan(probs).any() and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-5)
        if T <= 0.01:
            assert float(probs[best]) > 0.999, T
            assert {sample_logits(lg, p, torch.Generator().manual_seed(s)) for s in range(5)} == {best}
    # T -> 0 approaches greedy continuously: the winner's probability grows as T falls
    ps = [
        float(probabilities(lg, SamplingParams(temperature=T, top_p=1.0))[best])
        for T in (2, 1, 0.5, 0.2, 0.1)
    ]
    assert ps == sorted(ps) and ps[-1] > 0.99


def test_non_finite_logits() -> None:
    lg = torch.tensor([0.0, float("nan"), 1.0, -float("inf"), 2.0])
    probs = probabilities(lg, SamplingParams(top_p=1.0))
    assert probs[1] == 0 and probs[3] == 0 and not torch.isnan(probs).any()
    assert sample_logits(lg, SamplingParams(temperature=0)) == 4  # NaN is not the argmax
    inf = torch.tensor([0.0, float("inf"), 5.0, float("inf")])
    assert set(torch.nonzero(probabilities(inf, SamplingParams(top_p=1.0))).flatten().tolist()) == {1, 3}
    with pytest.raises(ValueError, match="every logit"):
        sample_logits(torch.full((4,), float("nan")), SamplingParams())
    with pytest.raises(ValueError, match="bans all"):
        Sampler(SamplingParams(token_ban=(0, 1, 2)), 3)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)
    assert Sampler(SamplingParams(seed=2**64 - 1), 3).sample(torch.zeros(3)) in range(3)
    assert Sampler(SamplingParams(seed=-1), 3).sample(torch.zeros(3)) in range(3)


_FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    logits=st.lists(_FLOATS, min_size=2, max_size=40),
    temperature=st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=100.0, exclude_min=True)),
    top_p=st.floats(min_value=0.0, max_value=1.0),
    top_k=st.integers(min_value=0, max_value=50),
    presence=st.floats(min_value=-100.0, max_value=100.0),
    frequency=st.floats(min_value=-100.0, max_value=100.0),
    decay=st.floats(min_value=0.0, max_value=1.0),
    ban=st.sets(st.integers(min_value=0, max_value=39), max_size=5),
    history=st.lists(st.integers(min_value=0, max_value=39), max_size=6),
    seed=st.integers(min_value=-(2**63), max_value=2**64 - 1),
)
def test_sampling_never_returns_garbage(
    logits, temperature, top_p, top_k, presence, frequency, decay, ban, history, seed
) -> None:
    V = len(logits)
    lg = torch.tensor(logits, dtype=torch.float32)
    ban = tuple(b for b in ban if b < V)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, presence_penalty=presence,
                            frequency_penalty=frequency, penalty_decay=decay, token_ban=ban, seed=seed)  # fmt: skip
    if len(ban) == V:
        with pytest.raises(ValueError):
            Sampler(params, V)
        return
    s = Sampler(params, V)
    for t in history:
        s.update(t % V)
    allowed = ban_tokens(lg, ban)
    if not (torch.isfinite(allowed).any() or torch.isposinf(allowed).any()):
        with pytest.raises(ValueError, match="every logit"):
            s.sample(lg)
        return
    tok = s.sample(lg)
    assert 0 <= tok < V and tok not in ban
    if not temperature:
        return
    probs = probabilities(ban_tokens(lg, ban), params)
    assert not torch.isnan(probs).any() and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-4)
    assert float(probs.max()) > 0


@settings(max_examples=200, deadline=None)
@given(
    logits=st.lists(
        st.floats(min_value=-(2.0**100), max_value=2.0**100, width=32), min_size=2, max_size=40, unique=True
    ),
    temperature=st.floats(min_value=0.0, max_value=1e-12, exclude_min=True),
    top_p=st.floats(min_value=0.0, max_value=1.0),
    top_k=st.integers(min_value=0, max_value=50),
)
def test_tiny_temperatures_are_greedy(logits, temperature, top_p, top_k) -> None:
    lg = torch.tensor(logits, dtype=torch.float32)
    best = int(torch.argmax(lg))
    gap = float(lg[best] - torch.topk(lg, 2).values[1])
    if gap < 1e-6 * max(1.0, abs(float(lg[best]))):  # near-ties: the draw may go either way
        return
    p = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    assert sample_logits(lg, p, torch.Generator().manual_seed(0)) == best


def test_bans_and_penalties() -> None:
    lg = _logits(10)
    b = ban_tokens(lg, [2, 3])
    assert b[2] == -float("inf") and b[3] == -float("inf") and torch.equal(b[4:], lg[4:])
    seen = torch.zeros(10, dtype=torch.bool)
    seen[1] = True
    counts = torch.zeros(10)
    counts[1] = 2.5
    p = penalize(lg, seen, counts, 0.2, 0.3)
    assert torch.isclose(p[1], lg[1] - 0.2 - 0.75) and torch.equal(p[2:], lg[2:])


def test_sampler_counts_decay_like_reference() -> None:
    weights = torch.ones(10)
    weights[7] = 0.0  # a "whitespace" token: presence only
    s = Sampler(SamplingParams(penalty_decay=0.5), 10, weights)
    s.update(3)
    s.update(7)
    s.update(3)
    assert torch.isclose(s.counts[3], torch.tensor(1.0 * 0.5 * 0.5 + 1.0))
    assert s.counts[7] == 0.0 and bool(s.seen[7]) and bool(s.seen[3]) and not bool(s.seen[0])


def test_greedy_is_argmax_of_penalised_logits() -> None:
    lg = torch.zeros(6)
    lg[4], lg[2] = 1.0, 0.9
    s = Sampler(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.0), 6)
    assert s(lg) == 4
    assert s(lg) == 2  # 4 is now penalised below 2
    assert sample_logits(lg, SamplingParams(temperature=0, token_ban=(4,))) == 2


def test_seed_reproducible_and_rows_independent() -> None:
    lg = torch.stack([_logits(500, 1), _logits(500, 2)])
    p = SamplingParams(temperature=1.2, top_p=0.95, seed=42)
    a = [Sampler(p, 500) for _ in range(2)]
    b = [Sampler(p, 500) for _ in range(2)]
    seq_a = [sample_rows(lg, a) for _ in range(20)]
    seq_b = [sample_rows(lg, b) for _ in range(20)]
    assert seq_a == seq_b
    solo = Sampler(p, 500)
    assert [solo(lg[1]) for _ in range(20)] == [r[1] for r in seq_a]
    c = Sampler(SamplingParams(temperature=1.2, top_p=0.95, seed=43), 500)
    assert [c(lg[0]) for _ in range(20)] != [r[0] for r in seq_a]


def test_sampled_frequencies_follow_probabilities() -> None:
    lg = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=0, presence_penalty=0, frequency_penalty=0)
    probs = probabilities(lg, p)
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.tensor([sample_logits(lg, p, g) for _ in range(n)])
    freq = torch.bincount(draws, minlength=5).float() / n
    assert torch.allclose(freq, probs, atol=0.015)
    assert probs[-1] == 0  # outside the nucleus


@pytest.mark.parametrize(
    "temperature,top_p,top_k", [(1.0, 0.85, 0), (0.7, 0.5, 0), (1.5, 0.95, 20), (1.0, 0.0, 0)]
)
def test_distribution_matches_reference(monkeypatch: pytest.MonkeyPatch, temperature, top_p, top_k) -> None:
    import rwkv.utils as ru

    captured = {}

    def fake_choice(a, p):  # the reference draws with np.random.choice(a=V, p=probs): capture p
        captured["p"] = np.asarray(p)
        return 0

    monkeypatch.setattr(ru.np.random, "choice", fake_choice)
    pipe = ru.PIPELINE.__new__(ru.PIPELINE)  # sample_logits needs no model or tokenizer
    lg = _logits(4000, seed=5)
    pipe.sample_logits(lg.clone(), temperature=temperature, top_p=top_p, top_k=top_k)
    ours = probabilities(lg, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)).numpy()
    np.testing.assert_allclose(ours, captured["p"], atol=1e-6)
