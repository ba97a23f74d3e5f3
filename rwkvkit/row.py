"""The rows of ``rwkvkit.decoder.BatchDecoder``: ``Row``, one sequence being generated (its prompt,
sampler, budget, hooks, what it records and how it ended), and ``PromptFeed``, a prompt being fed a
slice at a time for a row and its copies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .sampling import Sampler
from .state import State

TopN = list[tuple[int, float]]


@dataclass(eq=False)
class Row:
    """One sequence being generated. ``tokens`` grows as the engine emits; ``finish_reason`` ends it.

    ``on_token(token) -> bool`` is called with every emitted token (after its log-probability is
    recorded); returning True stops the row (finish reason "stop") after that token. Setting
    ``cancelled`` (from any thread) drops the row at the next step. With ``keep_state`` the engine
    leaves the final state in ``state`` and the next-token logits that go with it in ``logits``.

    Scoring: ``logprobs=k`` (k >= 0) fills ``token_logprobs`` (one per emitted token) and
    ``top_logprobs`` (the k most probable (token, logprob) at each step, most probable first);
    ``echo`` also fills ``prompt_logprobs`` / ``prompt_top_logprobs`` (first entry None).
    ``logit_bias`` {token: bias} is added to the logits before sampling (not to the logprobs).
    ``cache_end`` stores (prompt + tokens) -> final state in the decoder's prefix cache (rows that
    start from the model's initial state). ``cached_tokens``: prompt tokens the prefix cache saved.
    """

    prompt: list[int]
    sampler: Sampler
    max_tokens: int
    stop_tokens: frozenset[int] = frozenset()
    state: State | None = None  # the initial state (None = the model's); the final one with keep_state
    on_token: Callable[[int], bool] | None = None
    keep_state: bool = False
    logprobs: int | None = None
    echo: bool = False
    logit_bias: dict[int, float] | None = None
    cache_end: bool = False
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopN] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[TopN | None] | None = None
    cached_tokens: int = 0
    logits: torch.Tensor | None = None  # with keep_state: the next-token logits after ``state``
    start_logits: torch.Tensor | None = None  # [V]: the next-token logits that go with ``state``
    # (a finished row's ``logits``): with them an empty prompt continues from the state at once
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    cancelled: bool = False
    error: str | None = None  # why, when finish_reason is "error" (its prefill failed)
    _from_zero: bool = field(default=False, repr=False)  # started from the model's initial state
    _bias: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    _ride: list[int] = field(default_factory=list, repr=False)  # prompt tokens the decode step still feeds

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def _needs_end_state(self) -> bool:
        return self.keep_state or (self.cache_end and self._from_zero)


@dataclass(eq=False)
class PromptFeed:
    """A prompt being prefilled a slice at a time (``BatchDecoder(interleave=N)``) for ``row`` and its
    ``copies`` (rows with the same prompt and start state: n choices of one prompt)."""

    row: Row
    done: int = 0  # prompt tokens fed so far
    state: State | None = None  # the state after them (None: not started, the row's own start state)
    logits: torch.Tensor | None = None
    started: bool = False
    copies: list[Row] = field(default_factory=list)
    lps: list[float | None] = field(default_factory=list)  # echo: the prompt's log-probabilities so far
    tops: list[TopN | None] = field(default_factory=list)

    @property
    def rows(self) -> list[Row]:
        return [self.row, *self.copies]
