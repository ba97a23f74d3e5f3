"""The C sampler (``rwkvkit.ops.sample_native``) against the Python one: the same top-p cutoff as the
reference formula (``top_p_cutoff``) on any row, the same tokens as the tensor path for the same
uniforms, and the Python path still drawing when the extension is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from rwkvkit import sampling
from rwkvkit.ops import sample_native
from rwkvkit.sampling import Sampler, SamplingParams, draw_rows, sample_logits, top_p_cutoff
from rwkvkit.sampling_group import _draw_group_torch
from tests.cutoff_rows import cutoff_rows

pytestmark = pytest.mark.skipif(not sample_native.available(), reason="the C sampler is not built")

TOP_PS = [0.0, 1e-9, 0.3, 0.85, 0.95, 0.999, 0.9999999, float(np.nextafter(np.float32(1), np.float32(0)))]


def _rows(kind: str, b: int, V: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":  # the random model's rows: a nucleus of ~1/6 of the vocabulary
        x = torch.randn(b, V, generator=g) * 2
    elif kind == "very flat":  # nearly uniform: most of the vocabulary, many tokens per bucket
        x = torch.randn(b, V, generator=g) * 0.3
    elif kind == "peaked":  # a trained model's: a few tokens hold most of the mass
        x = torch.randn(b, V, generator=g) * 6
    elif kind == "ties":  # few distinct values: the cutoff falls inside runs of equal probabilities
        x = torch.randint(0, 4, (b, V), generator=g).float()
    elif kind == "zeros":  # most probabilities underflow to exactly 0
        x = torch.randn(b, V, generator=g) * 60
    else:  # one token with almost everything, the rest equal
        x = torch.zeros(b, V)
        x[:, 0] = 20.0
    return x


def _reference(p: torch.Tensor, top_p: float) -> np.ndarray:
    return np.array([top_p_cutoff(r, top_p) for r in p.numpy()], dtype=np.float32)


@pytest.mark.parametrize("kind", ["flat", "very flat", "peaked", "ties", "zeros", "spike"])
@pytest.mark.parametrize("V", [50, 5000, 65536])
def test_cutoffs_equal_the_reference(kind: str, V: int) -> None:
    p = torch.softmax(_rows(kind, 3, V, seed=V + len(kind)), dim=1)
    for top_p in TOP_PS:
        got, want = sample_native.top_p_cutoffs(p, top_p).numpy(), _reference(p, top_p)
        np.testing.assert_array_equal(got, want, err_msg=f"top_p={top_p}")
        assert torch.equal(p >= torch.from_numpy(got)[:, None], p >= torch.from_numpy(want)[:, None])


def test_cutoffs_of_rows_that_never_reach_top_p_or_have_no_candidate() -> None:
    p = torch.full((4, 4096), 1e-5)  # sums to 0.04: no prefix reaches top_p, the smallest candidate
    p[1, :10] = 0.09  # one row that does
    p[2] = 0.0  # no candidate: the reference sorts the whole row
    p[3, 7] = 1.0  # one token with everything
    for top_p in (0.0, 0.5, 0.99):
        np.testing.assert_array_equal(sample_native.top_p_cutoffs(p, top_p).numpy(), _reference(p, top_p))


@settings(max_examples=300, deadline=None)
@given(row=cutoff_rows())
def test_cutoffs_equal_the_reference_on_any_row(row: tuple[np.ndarray, float]) -> None:
    p, top_p = row
    assert sample_native.top_p_cutoffs(torch.from_numpy(p)[None], top_p)[0] == top_p_cutoff(p, top_p)


def test_values_that_are_not_probabilities_are_refused() -> None:
    for bad in (1.5, -0.1, float("nan")):
        p = torch.full((2, 100), 0.001)
        p[1, 3] = bad
        with pytest.raises(ValueError, match="probabilities"):
            sample_native.top_p_cutoffs(p, 0.9)


CASES = [  # temperature, top_p, top_k
    (1.0, 0.85, 0),
    (0.7, 0.9, 0),
    (1.3, 1.0, 40),
    (2.0, 0.99, 3),
    (1e-3, 0.5, 0),
    (1e-30, 0.85, 0),  # 1 / T capped at float32's largest value: greedy in effect
    (100.0, 0.3, 1000),
    (1.0, 0.0, 0),
    (0.9, 1.0, 0),
]


@pytest.mark.parametrize(("temperature", "top_p", "top_k"), CASES)
@pytest.mark.parametrize("kind", ["flat", "peaked", "ties", "zeros"])
def test_draws_equal_the_tensor_path(temperature: float, top_p: float, top_k: int, kind: str) -> None:
    """Fixed uniforms, the same tokens as ``_draw_group_torch`` (whose weights' exp is torch's: the
    two can part only where a uniform falls within an ulp of a CDF step)."""
    V = 3000
    x = _rows(kind, 8, V, seed=11)
    drop = None
    if 0 < top_k < V:
        drop = torch.ones(x.shape, dtype=torch.bool)
        drop.scatter_(1, torch.topk(x, top_k, dim=1).indices, False)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        u = torch.rand(8, generator=g)
        got = sample_native.draw(x, temperature, top_p, drop, u)
        want = _draw_group_torch(x.clone(), temperature, top_p, None if drop is None else drop.clone(), u)
        assert got == want


def test_a_target_on_a_cdf_step_takes_the_next_token_as_searchsorted_right_does() -> None:
    x = torch.full((1, 10), -1000.0)
    x[0, 2] = x[0, 5] = 0.0  # weights 1 and 1 (the rest 0): CDF 0, 0, 1, 1, 1, 2, ..., 2
    below = float(np.nextafter(np.float32(0.5), np.float32(0)))
    for u, token in ((0.0, 2), (below, 2), (0.5, 5), (0.99, 5)):
        t = torch.tensor([u])
        assert (
            sample_native.draw(x, 1.0, 1.0, None, t)
            == _draw_group_torch(x.clone(), 1.0, 1.0, None, t)
            == [token]
        )


def test_threads_do_not_change_the_tokens() -> None:
    x = _rows("flat", 16, 20000, seed=3)
    u = torch.rand(16, generator=torch.Generator().manual_seed(1))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample_native.draw(x, 0.8, 0.9, None, u)
        torch.set_num_threads(4)
        assert sample_native.draw(x, 0.8, 0.9, None, u) == one
    finally:
        torch.set_num_threads(n)


def test_one_row_and_batched_draws_agree_and_the_fallback_draws_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``sample_logits`` (one row) and ``draw_rows`` (a batch) both go through the C kernel; without the
    extension the tensor path draws, with the same tokens for these rows."""
    V = 4000
    x = _rows("flat", 6, V, seed=9) * torch.linspace(0.3, 3, 6)[:, None]
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, presence_penalty=0, frequency_penalty=0, seed=i)
              for i, (t, p, k) in enumerate(CASES[:6])]  # fmt: skip

    def batched() -> list[list[int]]:
        samplers = [Sampler(p, V) for p in params]
        return [draw_rows(x, samplers) for _ in range(10)]

    fast = batched()
    gens = [sampling.make_generator(p.seed) for p in params]
    alone = [[sample_logits(x[i], p, gens[i]) for i, p in enumerate(params)] for _ in range(10)]
    assert alone == fast
    monkeypatch.setattr(sample_native, "_sample_cpu", None)
    assert not sample_native.available()
    assert batched() == fast
    with pytest.raises(RuntimeError, match="not built"):
        sample_native.top_p_cutoffs(torch.softmax(x, 1), 0.5)


def test_the_portable_loops_give_what_the_avx512_ones_give() -> None:
    """Both ISAs' loops (compaction, selection, exp) on the same rows: the same cutoffs and tokens (on a
    CPU without AVX-512 both runs take the portable loops)."""
    x = torch.cat([_rows(kind, 2, 5000, seed=4) for kind in ("flat", "very flat", "peaked", "zeros")])
    p, u = torch.softmax(x, 1), torch.rand(8, generator=torch.Generator().manual_seed(2))
    native = sample_native._sample_cpu
    runs = []
    try:
        for avx512 in (True, False):
            native.use_avx512(avx512)
            runs.append(
                (
                    sample_native.top_p_cutoffs(p, 0.9).tolist(),
                    sample_native.draw(x, 0.01, 1.0, None, u),  # weights down to subnormals: the slow CDF
                    [sample_native.draw(x, t, 0.85, None, u) for t in (1.0, 0.6)],
                )
            )
    finally:
        native.use_avx512(True)
    assert runs[0] == runs[1]


def test_threads_that_draw_and_end_leave_the_kernel_working() -> None:
    """Each thread keeps its own scratch buffers (freed when it ends): draws from short-lived threads
    equal the main thread's."""
    import threading

    x = _rows("flat", 4, 3000, seed=8)
    u = torch.rand(4, generator=torch.Generator().manual_seed(3))
    want = sample_native.draw(x, 1.0, 0.85, None, u)
    got: list[list[int]] = []
    for _ in range(3):
        t = threading.Thread(target=lambda: got.append(sample_native.draw(x, 1.0, 0.85, None, u)))
        t.start()
        t.join()
    assert got == [want] * 3


def test_bench_sampling_prints_both_paths(capsys: pytest.CaptureFixture[str]) -> None:
    from rwkvkit.bench.sampling import main

    assert main(["--vocab", "3000", "--rows", "1,2", "--threads", "1", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("draw_rows tensor path") == 4 and "flat randn*2    rows   2" in out
