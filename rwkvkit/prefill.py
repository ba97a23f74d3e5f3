"""Prefill and the prefix cache: the prompt side of ``rwkvkit.decoder``.

- ``prefill``: run a prompt through the model in chunks of ``chunk_len`` tokens with the parallel
  form, keeping only the last position's logits (``last_only=True``).
- ``PrefixCache``: an LRU map token sequence -> (State, next-token logits), bounded in entries and
  in bytes. A prompt that extends a cached sequence (the next turn of a chat, a shared system
  prompt) only prefills the rest.
- ``prefill_cached``: ``prefill`` through a ``PrefixCache``.
- ``prefill_together``: several short prompts through one shared ``[k, T]`` forward, as many tokens
  each as the shortest has left (the decoder's burst of prompts on an idle engine: one weight read
  instead of one per prompt).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from .row import PromptFeed
from .state import State

DEFAULT_CHUNK_LEN = 256


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def prefill(
    model: torch.nn.Module,
    tokens: Sequence[int],
    state: State | None = None,
    *,
    chunk_len: int = DEFAULT_CHUNK_LEN,
) -> tuple[torch.Tensor, State]:
    """Feed ``tokens`` (one sequence) in chunks; return (next-token logits [V] fp32, state after them)."""
    if len(tokens) == 0:
        raise ValueError("prefill needs at least one token")
    if chunk_len <= 0:
        raise ValueError(f"chunk_len must be positive, got {chunk_len}")
    dev = model_device(model)
    logits = None
    for i in range(0, len(tokens), chunk_len):
        x = torch.tensor([list(tokens[i : i + chunk_len])], dtype=torch.long, device=dev)
        logits, state = model(x, state, last_only=True)
    assert logits is not None and state is not None
    return logits[0, -1].float(), state


def _nbytes(state: State, logits: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in state.tensors.values()) + logits.numel() * 4


class PrefixCache:
    """LRU cache of token sequence -> (State, next-token logits), for sequences that start from zero state.

    ``lookup`` returns the longest cached prefix of a prompt; entries are cloned on the way out (and
    on the way in unless ``copy=False``), so callers may modify what they get. At most
    ``max_entries`` entries and ``max_bytes`` bytes of tensors (None: no byte bound) are kept, the
    least recently used going first; an entry larger than ``max_bytes`` alone is not stored.
    ``hits`` and ``tokens_saved`` count its use.
    """

    def __init__(self, max_entries: int = 16, max_bytes: int | None = None) -> None:
        if max_entries <= 0 or (max_bytes is not None and max_bytes <= 0):
            raise ValueError(f"max_entries and max_bytes must be positive, got {max_entries}, {max_bytes}")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[State, torch.Tensor, int]] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.tokens_saved = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, tokens: Sequence[int]) -> tuple[int, State | None, torch.Tensor | None]:
        """(length of the longest cached prefix of ``tokens``, its state, its logits), or (0, None, None)."""
        best: tuple[int, ...] | None = None
        n = len(tokens)
        for key in self._entries:
            k = len(key)
            if (
                k <= n
                and (best is None or k > len(best))
                and key[-1] == tokens[k - 1]
                and tuple(tokens[:k]) == key
            ):
                best = key
        if best is None:
            return 0, None, None
        self._entries.move_to_end(best)
        state, logits, _ = self._entries[best]
        self.hits += 1
        self.tokens_saved += len(best)
        return len(best), state.clone(), logits.clone()

    def store(self, tokens: Sequence[int], state: State, logits: torch.Tensor, *, copy: bool = True) -> None:
        """Remember the state (and next-token logits) after ``tokens``; ``copy=False`` takes ownership."""
        key = tuple(int(t) for t in tokens)
        size = _nbytes(state, logits)
        if not key or (self.max_bytes is not None and size > self.max_bytes):
            return
        if copy:
            state, logits = state.clone(), logits.detach().clone()
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old[2]
        self._entries[key] = (state, logits.reshape(-1), size)
        self.nbytes += size
        while len(self._entries) > self.max_entries or (
            self.max_bytes is not None and self.nbytes > self.max_bytes
        ):
            self.nbytes -= self._entries.popitem(last=False)[1][2]

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def prefill_cached(
    model: torch.nn.Module,
    tokens: Sequence[int],
    state: State | None = None,
    *,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    cache: PrefixCache | None = None,
) -> tuple[torch.Tensor, State]:
    """``prefill`` that reuses the longest cached prefix (only when starting from the model's initial state)."""
    if cache is None or state is not None:
        return prefill(model, tokens, state.clone() if state is not None else None, chunk_len=chunk_len)
    n, cached_state, cached_logits = cache.lookup(tokens)
    if n == len(tokens):
        assert cached_state is not None and cached_logits is not None
        return cached_logits, cached_state
    logits, out_state = prefill(model, tokens[n:], cached_state, chunk_len=chunk_len)
    cache.store(tokens, out_state, logits)
    return logits, out_state


@torch.no_grad()
def prefill_together(model: torch.nn.Module, feeds: Sequence[PromptFeed]) -> None:
    """Feed every prompt in ``feeds`` the number of tokens the shortest of them has left (at least one,
    at most a chunk's worth), in one shared ``[k, T]`` forward: one weight read for all of them. Each
    feed's ``state``, ``logits`` (next-token, fp32) and ``done`` are updated; the shortest are then
    complete, the others have the rest of their prompt left."""
    n = min(len(f.row.prompt) - f.done for f in feeds)
    if n <= 0:
        raise ValueError("prefill_together needs prompts with tokens left to feed")
    x = torch.tensor(
        [f.row.prompt[f.done : f.done + n] for f in feeds], dtype=torch.long, device=model_device(model)
    )
    start = State.stack([f.state if f.state is not None else model.init_state(1) for f in feeds])
    logits, state = model(x, start, last_only=True)
    for i, f in enumerate(feeds):
        f.state, f.logits, f.done = state.select(i), logits[i, -1].float(), f.done + n
