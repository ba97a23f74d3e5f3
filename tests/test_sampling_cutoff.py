"""The batched top-p cutoff (``top_p_cutoffs``, which sorts only a nucleus) against the reference one
(``top_p_cutoff``, which sorts every candidate): the same cutoff, hence the same kept set, ties included,
on flat, peaked, tied and unnormalised rows, and the same tokens drawn by the batched sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from rwkvkit import sampling_group
from rwkvkit.sampling import Sampler, SamplingParams, draw_rows, top_p_cutoff, top_p_cutoffs
from tests.cutoff_rows import cutoff_rows


def _rows(kind: str, b: int, V: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    if kind == "flat":  # a random model's logits: the nucleus is most of the vocabulary
        x = torch.randn(b, V, generator=g) * 0.5
    elif kind == "peaked":  # a trained model's: a few tokens hold most of the mass
        x = torch.randn(b, V, generator=g) * 4
    elif kind == "ties":  # few distinct values: the cutoff falls inside runs of equal probabilities
        x = torch.randint(0, 4, (b, V), generator=g).float()
    else:  # one token with almost everything, the rest equal
        x = torch.zeros(b, V)
        x[:, 0] = 20.0
    return torch.softmax(x, dim=1).numpy()


def _reference(p: np.ndarray, top_p: float) -> np.ndarray:
    return np.array([top_p_cutoff(r, top_p) for r in p], dtype=np.float32)


@pytest.mark.parametrize("kind", ["flat", "peaked", "ties", "spike"])
@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.85, 0.95, 0.999, 0.9999999])
def test_cutoffs_equal_the_reference(kind: str, top_p: float) -> None:
    p = _rows(kind, 6, 4096, seed=len(kind) * 31 + int(top_p * 1000))
    got, want = top_p_cutoffs(p, top_p), _reference(p, top_p)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(p >= got[:, None], p >= want[:, None])  # the same kept set


def test_rows_that_never_reach_top_p_fall_back_to_the_reference() -> None:
    p = np.full((3, 4096), 1e-5, dtype=np.float32)  # sums to 0.04: no prefix reaches top_p
    p[1, :10] = 0.09  # and one row that does
    np.testing.assert_array_equal(top_p_cutoffs(p, 0.5), _reference(p, 0.5))


def test_only_the_nucleus_is_sorted(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _rows("flat", 4, 8192, seed=1)
    sorted_sizes: list[int] = []
    real_sort = np.sort

    def counting_sort(a, *args, **kw):  # noqa: ANN001, ANN202
        sorted_sizes.append(a.size)
        return real_sort(a, *args, **kw)

    monkeypatch.setattr(sampling_group.np, "sort", counting_sort)
    got = top_p_cutoffs(p, 0.85)
    nucleus = int((p[0] >= got[0]).sum())
    biggest = max(sorted_sizes[1:])  # after the one 2-D sort of the sample
    assert biggest < 1.3 * nucleus < 8192  # not every candidate: no fallback to the reference
    monkeypatch.undo()
    np.testing.assert_array_equal(got, _reference(p, 0.85))


@settings(max_examples=300, deadline=None)
@given(row=cutoff_rows(min_tail=2048))
def test_cutoffs_equal_the_reference_on_any_row(row: tuple[np.ndarray, float]) -> None:
    p, top_p = row
    assert top_p_cutoffs(p[None], top_p)[0] == top_p_cutoff(p, top_p)


def test_batched_sampler_draws_what_the_reference_cutoff_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(8, 3000, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.3, 5, 8)[:, None]
    params = SamplingParams(temperature=0.9, top_p=0.8, presence_penalty=0, frequency_penalty=0)

    def draw_all() -> list[list[int]]:
        samplers = [Sampler(params.with_(seed=i), 3000) for i in range(8)]
        return [draw_rows(x, samplers) for _ in range(20)]

    monkeypatch.setattr(sampling_group.sample_native, "available", lambda: False)  # the tensor path
    fast = draw_all()
    monkeypatch.setattr(sampling_group, "top_p_cutoffs", _reference)
    assert draw_all() == fast
