"""The chunked WKV forms' autograd graphs grow with the number of chunks only through operations whose
backward costs one chunk: no per-chunk indexing (``x[:, c]``), whose backward writes into a zeroed
gradient of the whole tensor, once per chunk (Finch's backward was quadratic in T that way: 0.84 s at
8k tokens, 8.0 s at 16k)."""

from __future__ import annotations

import torch

from rwkvkit.ops import wkv6
from rwkvkit.ops.wkv4 import wkv4


def _node_counts(t: torch.Tensor) -> dict[str, int]:
    seen, stack, out = set(), [t.grad_fn], {}
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        out[type(f).__name__] = out.get(type(f).__name__, 0) + 1
        stack += [n for n, _ in f.next_functions]
    return out


def _wkv6_graph(T: int) -> dict[str, int]:
    g = torch.Generator().manual_seed(0)
    r, k, v = (torch.randn(1, T, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    w = (-torch.rand(1, T, 2, 16, generator=g).exp()).requires_grad_(True)
    u = torch.randn(2, 16, generator=g, requires_grad=True)
    return _node_counts(wkv6(r, k, v, w, u, backend="chunked", chunk_size=16)[0])


def _wkv4_graph(T: int) -> dict[str, int]:
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, T, 8, generator=g, requires_grad=True) for _ in range(2))
    w = (-torch.rand(8, generator=g).exp()).requires_grad_(True)
    u = torch.randn(8, generator=g, requires_grad=True)
    return _node_counts(wkv4(w, u, k, v, backend="chunked", chunk_size=4)[0])


def test_no_per_chunk_indexing_in_the_backward() -> None:
    for graph in (_wkv6_graph, _wkv4_graph):
        small, big = graph(64), graph(256)  # 4x the chunks
        assert small.get("SelectBackward0", 0) == big.get("SelectBackward0", 0), graph.__name__
        assert big.get("UnbindBackward0", 0) > 0  # the loops over chunks read unbound slices
