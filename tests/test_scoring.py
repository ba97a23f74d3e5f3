"""rwkvkit.scoring against the reference (the rwkv package's log-softmax of the same sequences) and
against itself: batched == one at a time, shared prefixes computed once, streamed == step by step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rwkvkit
from rwkvkit import scoring
from rwkvkit.testing import random_checkpoint
from tests.reference import load_reference, reference_logits

TOL = 1e-4
V = 1000


def _model_and_ref(tmp_path, version):
    path = tmp_path / f"rwkv{version}.pth"
    random_checkpoint(version, 2, 64, V, head_size=32 if version > 4 else 64, seed=version, path=path)
    return rwkvkit.load(path), load_reference(path)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _ref_logprobs(ref, tokens: list[int]) -> torch.Tensor:
    """Reference log-softmax [T, V] at every position (position t predicts token t+1)."""
    return torch.log_softmax(reference_logits(ref, tokens)[0], -1)


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_token_logprobs_match_reference(tmp_path, version):
    model, ref = _model_and_ref(tmp_path, version)
    tokens = _ids(70, seed=version)
    want = _ref_logprobs(ref, tokens)
    got = scoring.token_logprobs(model, tokens, top_n=5, chunk_len=16)  # five chunks
    assert got.logprobs[0] is None and got.greedy[0] is None and got.top[0] is None
    tgt = torch.tensor(tokens[1:])
    want_lp = want[:-1].gather(1, tgt[:, None])[:, 0]
    assert (torch.tensor(got.logprobs[1:]) - want_lp).abs().max().item() <= TOL
    assert got.greedy[1:] == (want[:-1].argmax(-1) == tgt).tolist()
    for t in range(1, len(tokens)):
        vals, ids = want[t - 1].topk(5)
        assert [i for i, _ in got.top[t]] == ids.tolist()
        assert max(abs(v - w) for (_, v), w in zip(got.top[t], vals.tolist())) <= TOL
    assert abs(got.total - want_lp.sum().item()) <= TOL * len(tokens)
    assert (got.logits - reference_logits(ref, tokens)[0][-1]).abs().max().item() <= TOL

    # from a state and its logits, the first token is scored too, and nothing else changes
    with torch.no_grad():
        logits, state = model(tokens[:23], last_only=True)
    rest = scoring.token_logprobs(model, tokens[23:], state, logits[0, -1])
    assert (torch.tensor(rest.logprobs) - want_lp[22:]).abs().max().item() <= TOL


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_loglikelihood_matches_reference(tmp_path, version):
    model, ref = _model_and_ref(tmp_path, version)
    shared, other = _ids(40, seed=10), _ids(25, seed=11)
    pairs = [(shared, _ids(k, seed=20 + k)) for k in (1, 3, 6)] + [(other, _ids(4, seed=30))]
    # a greedy continuation (the reference's argmax, token by token) must be reported as greedy
    greedy_cont, seq = [], list(other)
    for _ in range(3):
        greedy_cont.append(int(_ref_logprobs(ref, seq)[-1].argmax()))
        seq.append(greedy_cont[-1])
    pairs.append((other, greedy_cont))
    got = scoring.loglikelihood(model, pairs)
    for (ctx, cont), s in zip(pairs, got):
        lp = _ref_logprobs(ref, list(ctx) + list(cont))
        n = len(ctx)
        want = [lp[n - 1 + i, t].item() for i, t in enumerate(cont)]
        assert max(abs(a - b) for a, b in zip(s.token_logprobs, want)) <= TOL
        assert abs(s.logprob - sum(want)) <= TOL * len(cont)
        assert s.greedy == all(int(lp[n - 1 + i].argmax()) == t for i, t in enumerate(cont))
    assert got[-1].greedy and not got[0].greedy


@pytest.fixture(scope="module")
def finch(tmp_path_factory):
    path = tmp_path_factory.mktemp("finch") / "finch.pth"
    random_checkpoint(6, 2, 64, V, head_size=32, seed=3, path=path)
    return rwkvkit.load(path)


def _direct(model, ctx, cont) -> list[float]:
    """Each continuation token's log-probability from one whole-sequence forward."""
    with torch.no_grad():
        lp = torch.log_softmax(model(list(ctx) + list(cont))[0][0], -1)
    return [lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)]


def test_batched_equals_one_at_a_time(finch):
    a, b = _ids(50, seed=1), _ids(33, seed=2)
    pairs = [
        (a, _ids(4, seed=3)),
        (b, _ids(1, seed=4)),
        (a, _ids(7, seed=5)),  # same context as the first
        (a[:30] + _ids(5, seed=6), _ids(2, seed=7)),  # shares a 30-token prefix with a
        (a[:30] + _ids(9, seed=8), _ids(3, seed=9)),
        (a[:30], _ids(5, seed=10)),  # a context that is a prefix of other contexts
        (b + [1], _ids(40, seed=11)),  # a continuation longer than batch_tokens: streamed alone
        (_ids(3, seed=12), _ids(12, seed=13)),
    ]
    batched = scoring.loglikelihood(finch, pairs, batch_size=3, batch_tokens=24, min_shared=8, top_n=3)
    for (ctx, cont), s in zip(pairs, batched):
        one = scoring.loglikelihood(finch, [(ctx, cont)], batch_size=1, min_shared=0, top_n=3)[0]
        assert max(abs(x - y) for x, y in zip(s.token_logprobs, one.token_logprobs)) <= 1e-5
        assert s.greedy == one.greedy and len(s.token_logprobs) == len(cont)
        assert [[i for i, _ in t] for t in s.top] == [[i for i, _ in t] for t in one.top]
        assert max(abs(x - y) for x, y in zip(s.token_logprobs, _direct(finch, ctx, cont))) <= TOL
        assert s.logprob == pytest.approx(sum(s.token_logprobs), abs=1e-9)


def _count_fed(model, monkeypatch) -> list[int]:
    fed: list[int] = []
    forward = model.forward

    def counting(tokens, state=None, **kw):
        fed.append(tokens.numel() if isinstance(tokens, torch.Tensor) else len(tokens))
        return forward(tokens, state, **kw)

    monkeypatch.setattr(model, "forward", counting)
    return fed


def test_shared_contexts_and_prefixes_are_prefilled_once(finch, monkeypatch):
    ctx = _ids(60, seed=40)
    choices = [_ids(3, seed=41 + i) for i in range(4)]  # 4-way multiple choice
    fed = _count_fed(finch, monkeypatch)
    got = scoring.loglikelihood(finch, [(ctx, c) for c in choices])
    # the context once, then the four continuations' first two tokens as one [4, 2] batch
    assert fed == [60, 8]
    for c, s in zip(choices, got):
        assert max(abs(x - y) for x, y in zip(s.token_logprobs, _direct(finch, ctx, c))) <= TOL

    fed.clear()
    prefix = _ids(40, seed=50)
    ctxs = [prefix + _ids(5, seed=51 + i) for i in range(3)]
    scoring.loglikelihood(finch, [(c, [7]) for c in ctxs], min_shared=16)
    assert sum(fed) == 40 + 3 * 5  # the shared 40 tokens once
    fed.clear()
    scoring.loglikelihood(finch, [(c, [7]) for c in ctxs], min_shared=0)
    assert sum(fed) == 3 * 45


def test_results_keep_input_order(finch):
    pairs = [(_ids(5 + 7 * i % 30, seed=60 + i), _ids(1 + i % 4, seed=70 + i)) for i in range(12)]
    got = scoring.loglikelihood(finch, pairs, batch_size=4)
    for (ctx, cont), s in zip(pairs, got):
        assert max(abs(x - y) for x, y in zip(s.token_logprobs, _direct(finch, ctx, cont))) <= TOL


def test_empty_context_continues_from_state_and_logits(finch):
    ctx, cont = _ids(20, seed=80), _ids(5, seed=81)
    with torch.no_grad():
        logits, state = finch(ctx, last_only=True)
    got = scoring.loglikelihood(finch, [([], cont), (cont[:2], cont[2:])], state, logits[0, -1])
    assert max(abs(x - y) for x, y in zip(got[0].token_logprobs, _direct(finch, ctx, cont))) <= TOL
    assert max(abs(x - y) for x, y in zip(got[1].token_logprobs, _direct(finch, ctx, cont)[2:])) <= TOL


def test_rolling_equals_the_sum_of_steps_on_a_text_longer_than_any_chunk():
    from rwkvkit.demo import MODEL, VOCAB

    model, tok = rwkvkit.load(MODEL), rwkvkit.Tokenizer(VOCAB)
    text = (Path(__file__).parents[1] / "rwkvkit" / "generation.py").read_text(encoding="utf-8")
    tokens = [0] + tok.encode(text)[:320]  # > the demo's training context (128) and any chunk
    seen: list[int] = []
    got = scoring.rolling_loglikelihood(model, iter(tokens), chunk_len=64, progress=seen.append)
    assert seen == [min(64 * (i + 1), len(tokens)) for i in range((len(tokens) + 63) // 64)]
    state, total, greedy, steps = None, 0.0, 0, []
    with torch.no_grad():
        for t, nxt in zip(tokens, tokens[1:]):  # the recurrent form, one token per call
            out, state = model([t], state)
            lp = torch.log_softmax(out[0, -1], -1)
            total += lp[nxt].item()
            greedy += int(lp.argmax()) == nxt
            steps.append(lp[nxt].item())
    assert got.tokens == len(tokens) - 1 and got.greedy == greedy
    assert abs(got.logprob - total) <= 1e-3  # 320 terms, each within ~1e-6
    per_token = scoring.token_logprobs(model, tokens, chunk_len=64).logprobs[1:]
    assert max(abs(a - b) for a, b in zip(per_token, steps)) <= TOL


def test_rolling_from_a_state_scores_the_first_token(finch):
    ctx, doc = _ids(10, seed=90), _ids(50, seed=91)
    with torch.no_grad():
        logits, state = finch(ctx, last_only=True)
    got = scoring.rolling_loglikelihood(finch, doc, state, logits[0, -1], chunk_len=7)
    assert got.tokens == 50
    assert got.logprob == pytest.approx(sum(_direct(finch, ctx, doc)), abs=1e-3)


def test_score_logits_matches_log_softmax():
    x = torch.randn(6, 50)
    tgt = torch.tensor([1, 2, 3, 0, 49, 7])
    want = torch.log_softmax(x, -1)
    lp, greedy, (tv, ti) = scoring.score_logits(x.clone(), tgt, top_n=4)
    assert torch.allclose(lp, want[torch.arange(6), tgt], atol=1e-6)
    assert torch.equal(greedy, want.argmax(-1) == tgt)
    assert torch.allclose(tv, want.topk(4).values, atol=1e-6) and torch.equal(ti, want.topk(4).indices)
    rows = torch.tensor([0, 0, 5])  # several targets from one row
    lp2, _, _ = scoring.score_logits(x.clone(), torch.tensor([3, 4, 5]), rows)
    assert torch.allclose(lp2, want[rows, torch.tensor([3, 4, 5])], atol=1e-6)


def test_bad_input_is_named(finch):
    with pytest.raises(ValueError, match="empty continuation"):
        scoring.loglikelihood(finch, [([1, 2], [])])
    with pytest.raises(ValueError, match="empty context"):
        scoring.loglikelihood(finch, [([], [1, 2])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        scoring.loglikelihood(finch, [([1, V], [2])])
    with pytest.raises(ValueError, match="without the state"):
        scoring.token_logprobs(finch, [1, 2], logits=torch.zeros(V))
    with pytest.raises(ValueError, match="at least one token"):
        scoring.token_logprobs(finch, [])
    empty = scoring.rolling_loglikelihood(finch, [])
    assert empty.tokens == 0 and empty.logprob == 0.0 and empty.state is None


def test_token_ids_must_be_integers(tmp_path):
    """A float id is refused, not truncated (it would score id 1 and report 1.7)."""
    path = tmp_path / "m.pth"
    random_checkpoint(6, 1, 64, V, head_size=32, seed=0, path=path)
    model = rwkvkit.load(path)
    with pytest.raises(ValueError, match=r"token ids must be integers, got 1\.7"):
        scoring.token_logprobs(model, [1.7, 2.2])
    with pytest.raises(ValueError, match=r"got 2\.5"):
        scoring.rolling_loglikelihood(model, iter([1, 2.5]))
    assert scoring.token_logprobs(model, torch.tensor([1, 2])).tokens == [1, 2]
