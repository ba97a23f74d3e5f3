"""The group draw under ``rwkvkit.sampling``: one token for each of several rows of logits that share
temperature, top-p and top-k (``draw_group``), by the C kernel of ``ops.sample_native`` when it is
built, else by tensor operations over the whole group; and the reference's top-p cutoff, for one row
(``top_p_cutoff``) and for a batch sorting only each row's nucleus (``top_p_cutoffs``). Penalties,
bans and the per-sequence samplers stay in ``rwkvkit.sampling``, which draws every row through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .ops import sample_native
from .ops.sample_native import _INV_T_MAX


def top_p_cutoff(p: np.ndarray, top_p: float) -> float:
    """The top-p cutoff of probabilities ``p`` [V] (float32 NumPy): the reference's
    ``desc = sort(p)[::-1]; desc[argmax(cumsum(desc) >= top_p)]``.

    Tokens below ``(1 - top_p) / V`` hold less than ``1 - top_p`` in total, so the cutoff is never below
    that: sorting only the tokens above it gives the same prefix sums, hence the same cutoff. (The
    float32 prefix sums in sorted order are what decide the cutoff exactly as the reference does, so
    the nucleus is sorted: ~1 ms for the ~30k candidates of a flat 65536-token distribution.)
    """
    cand = p[p >= (1.0 - top_p) / p.size]
    desc = np.sort(cand if cand.size else p)[::-1]
    reached = np.cumsum(desc) >= top_p
    return float(desc[int(np.argmax(reached))] if reached.any() else desc[-1])


def draw_group(x: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generators: Sequence[torch.Generator | None], top: torch.Tensor | None = None) -> list[int]:  # fmt: skip
    """``draw(sampling_weights(row))`` for every row of finite float32 CPU logits [b, V] (contiguous):
    the top-k mask and one uniform per row's generator here, the rest in C (``ops.sample_native``)
    when it is built, else ``_draw_group_torch``. ``top`` [b]: ``x.amax(1)`` if the caller has it."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 here (0 is the greedy path), got {temperature!r}")
    V = x.shape[1]
    drop = None  # the tokens top-k leaves out
    if 0 < top_k < V:
        drop = torch.ones(x.shape, dtype=torch.bool)
        drop.scatter_(1, torch.topk(x, top_k, dim=1).indices, False)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float32) for g in generators])
    if sample_native.available():
        return sample_native.draw(x, temperature, top_p, drop, u, top)
    return _draw_group_torch(x, temperature, top_p, drop, u)


def _draw_group_torch(x: torch.Tensor, temperature: float, top_p: float, drop: torch.Tensor | None,
                      u: torch.Tensor) -> list[int]:  # fmt: skip
    """``draw_group`` as tensor ops on the whole group (the same operations, row by row, as the one-row
    functions ``draw(sampling_weights(row))``: the same tokens)."""
    V = x.shape[1]
    if top_p < 1.0:
        probs = torch.softmax(x, dim=1)  # finite rows: no NaN, so "< cutoff" is "not >= cutoff"
        p_drop = probs < torch.from_numpy(top_p_cutoffs(probs.numpy(), top_p)).unsqueeze(1)
        drop = p_drop if drop is None else p_drop.logical_or_(drop)
        del probs
    w = x - x.amax(1, keepdim=True)
    if temperature != 1.0:
        w.mul_(min(1.0 / temperature, _INV_T_MAX))
    w.exp_()
    if drop is not None:
        w.masked_fill_(drop, 0.0)
    cdf = torch.cumsum(w, 1)
    u = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=V - 1).tolist()


_STRIDE = 32  # top_p_cutoffs estimates each row's nucleus from every 32nd token
_SLACK = 0.04  # ... and aims at this much more mass than top_p, so the estimate rarely falls short


def top_p_cutoffs(probs: np.ndarray, top_p: float) -> np.ndarray:
    """``top_p_cutoff`` of every row of probabilities [b, V] (float32 NumPy), sorting only a nucleus.

    The cutoff depends only on the largest tokens, in descending order, up to the first float32 prefix
    sum that reaches ``top_p``: any threshold ``t`` gives the same cutoff from the tokens ``>= t``
    alone, as long as their prefix sums reach ``top_p`` (the same sorted prefix, the same sums).
    ``t`` is estimated from every ``_STRIDE``-th token of each row (one small 2-D sort): the value
    above which the sample holds ``top_p + _SLACK`` of the row's mass. A row whose tokens ``>= t``
    fall short gets ``top_p_cutoff`` itself, so the result is always the reference's. On the random
    0.1B model's 65536-token rows (~30k tokens above the reference's bound, a nucleus of ~10k at
    ``top_p = 0.85``) this sorts about a third as many tokens.
    """
    p2 = np.ascontiguousarray(probs, dtype=np.float32).reshape(-1, probs.shape[-1])
    b, V = p2.shape
    if V < 64 * _STRIDE:
        return np.array([top_p_cutoff(p, top_p) for p in p2], dtype=np.float32)
    sub = np.sort(p2[:, ::_STRIDE], axis=1)[:, ::-1]
    est = np.cumsum(sub, axis=1, dtype=np.float64)  # the sample's share of the row's mass: rows of
    enough = est >= (top_p + _SLACK) * est[:, -1:]  # probabilities sum to 1 (others may fall back)
    first = enough.argmax(axis=1)
    t = np.where(enough.any(axis=1), sub[np.arange(b), first], 0.0).astype(np.float32)
    keep = p2 >= np.maximum(t, np.float32(sample_native.lowest_at_least((1.0 - top_p) / V)))[:, None]
    out = np.empty(b, dtype=np.float32)
    for i, p in enumerate(p2):
        out[i] = _cutoff_above(p, top_p, keep[i])
    return out


def _cutoff_above(p: np.ndarray, top_p: float, keep: np.ndarray) -> float:
    """``top_p_cutoff(p, top_p)`` from the tokens ``keep`` marks (those ``>=`` a threshold and ``>=`` the
    reference's own bound: the largest of its sorted candidates); the reference itself when their
    sums do not reach ``top_p``."""
    cand = np.compress(keep, p)
    if cand.size:
        desc = np.sort(cand)[::-1]
        reached = np.cumsum(desc) >= top_p
        if reached.any():
            return float(desc[int(np.argmax(reached))])
    return top_p_cutoff(p, top_p)
