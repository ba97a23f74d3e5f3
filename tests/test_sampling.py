"""Sampling filters alone, and against rwkv.utils.PIPELINE.sample_logits's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkvkit.sampling import (
    Sampler,
    SamplingParams,
    apply_temperature,
    ban_tokens,
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
    assert SamplingParams(temperature=0).greedy


def test_top_p_keeps_smallest_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    assert torch.equal(top_p_filter(probs, 0.7) > 0, torch.tensor([False, True, True, False]))
    assert torch.equal(top_p_filter(probs, 0.8) > 0, torch.tensor([False, True, True, False]))
    assert torch.equal(top_p_filter(probs, 0.81) > 0, torch.tensor([False, True, True, True]))
    assert torch.equal(top_p_filter(probs, 0.0) > 0, torch.tensor([False, True, False, False]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_top_p_wide_nucleus() -> None:
    probs = torch.full((5000,), 1 / 5000)
    probs[0] = 0.0
    probs = probs / probs.sum()
    kept = top_p_filter(probs, 0.9)
    assert int((kept > 0).sum()) == 4999  # all equal: every one reaches the cutoff


def test_top_k_and_temperature() -> None:
    probs = torch.softmax(_logits(100), 0)
    kept = top_k_filter(probs, 5)
    assert int((kept > 0).sum()) == 5
    assert set(torch.nonzero(kept).flatten().tolist()) == set(torch.topk(probs, 5).indices.tolist())
    assert torch.equal(top_k_filter(probs, 0), probs)
    lg = _logits(50)
    t = apply_temperature(torch.softmax(lg, 0), 0.5)
    assert torch.allclose(t, torch.softmax(lg / 0.5, 0), atol=1e-6)


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
