"""The token-level engine under ``rwkvkit.generate``: prefill, the prefix cache, and the batched decoder.

- ``prefill``: run a prompt through the model in chunks of ``chunk_len`` tokens with the parallel
  form, keeping only the last position's logits (``last_only=True``).
- ``PrefixCache``: an LRU map token sequence -> (State, next-token logits), bounded in entries and
  in bytes. A prompt that extends a cached sequence (the next turn of a chat, a shared system
  prompt) only prefills the rest. The decoder stores every prompt it prefills, and, for rows that
  ask (``Row.cache_end``), the state after the prompt and every emitted token: a chat's next turn,
  whose prompt is this turn's prompt + reply + the new message, then costs only the new message.
- ``BatchDecoder``: rows (``Row``) join after their own prefill, all active rows are decoded together
  with one ``[B, 1]`` forward per step (one weight read serves every row), and each row leaves when
  it hits a stop token, its token budget, its ``on_token`` hook says stop, or it is cancelled. It
  knows nothing about text; the server drives it from a thread. With ``interleave=N`` a new row's
  prompt is not prefilled by ``add`` but by the following ``step`` calls, N prompt tokens per step in
  all while other rows are decoding (several short prompts, or a slice of a long one; waiting
  prompts take turns), so a long prompt arriving never stalls the running streams for longer than N
  tokens' prefill; with nothing decoding a step prefills ``chunk_len`` tokens.
  ``add(row, copies=[...])`` prefills one prompt once for several rows (n choices of one prompt):
  each copy joins the batch with its own copy of the state.

Scoring while decoding: a row with ``logprobs=k`` records every emitted token's log-probability and
the ``k`` most probable alternatives; with ``echo`` its prompt is prefilled through
``rwkvkit.scoring.token_logprobs`` (every position's logits, same slices) and each prompt token's
log-probability is recorded too (the first one None: nothing precedes it). Log-probabilities are the
model's distribution, the log-softmax of the raw logits, computed before and independently of
``logit_bias``, penalties, bans, temperature, top-p and top-k. Sampling itself is batched
(``rwkvkit.sampling.sample_rows``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .sampling import Sampler, draw_rows
from .scoring import score_logits, token_logprobs
from .state import State

DEFAULT_CHUNK_LEN = 256
TopN = list[tuple[int, float]]
# ``BatchDecoder.timings``: decode steps and rows decoded (counts), then seconds spent in ``step``:
# prompt slices, sampling (logits copy, bias, draws), logprobs, the per-row loop (bookkeeping and the
# rows' on_token hooks: the server's text decoding), the [B, 1] model forward, and the whole step.
TIMINGS = ("steps", "rows", "prefill_s", "sample_s", "score_s", "emit_s", "model_s", "step_s")


def _device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _vocab_size(model: torch.nn.Module) -> int:
    return int(model.config.vocab_size)


def _check_tokens(tokens: Sequence[int], vocab_size: int, what: str = "prompt") -> list[int]:
    out = [int(t) for t in tokens]
    bad = [t for t in out if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} contains token ids outside [0, {vocab_size}): {bad[:5]}")
    return out


# ---- prefill and the prefix cache ----------------------------------------------------------------
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
    dev = _device(model)
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


# ---- rows -----------------------------------------------------------------------------------------
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
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    cancelled: bool = False
    error: str | None = None  # why, when finish_reason is "error" (its prefill failed)
    _from_zero: bool = field(default=False, repr=False)  # started from the model's initial state
    _bias: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def _needs_end_state(self) -> bool:
        return self.keep_state or (self.cache_end and self._from_zero)


@dataclass(eq=False)
class _Prefill:
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


# ---- the batched decoder --------------------------------------------------------------------------
class BatchDecoder:
    """Decode many rows together: one ``[B, 1]`` forward per step over a stacked State."""

    def __init__(self, model: torch.nn.Module, *, chunk_len: int = DEFAULT_CHUNK_LEN,
                 cache: PrefixCache | None = None, interleave: int = 0) -> None:  # fmt: skip
        if chunk_len <= 0 or interleave < 0:
            raise ValueError(f"chunk_len must be positive and interleave >= 0, got {chunk_len}, {interleave}")
        self.model = model
        self.chunk_len = chunk_len
        self.cache = cache
        self.interleave = interleave
        self.rows: list[Row] = []
        self.prefilling: list[_Prefill] = []  # prompts still being prefilled (interleave > 0), in turn order
        self._state: State | None = None  # stacked state of self.rows
        self._logits: torch.Tensor | None = None  # [B, V] next-token logits of self.rows
        self._device = _device(model)
        self._vocab = _vocab_size(model)
        self.timings = dict.fromkeys(TIMINGS, 0.0)  # cumulative seconds (and counts) of ``step``
        self.clock: Callable[[], float] = time.perf_counter  # what ``timings`` measure (process_time: CPU)

    def __len__(self) -> int:
        return len(self.rows) + sum(1 + len(p.copies) for p in self.prefilling)

    def add(self, row: Row, copies: Sequence[Row] = ()) -> None:
        """Check ``row`` and prefill its prompt (now, or over the next steps with ``interleave``); it joins
        the decoding batch when its prompt is done. ``copies``: more rows with the same prompt and
        start state, prefilled with it once (each decodes on its own)."""
        for r in (row, *copies):
            self._check(r)
            if (r.prompt, r.echo, r.echo and r.logprobs, r.state is None) != (
                row.prompt,
                row.echo,
                row.echo and row.logprobs,
                row.state is None,
            ):
                raise ValueError("copies must have the row's prompt, start state and echo (and its logprobs)")
        p = _Prefill(row, copies=list(copies))
        if self.interleave:
            self.prefilling.append(p)
            return
        self._start(p)
        if p.done < len(row.prompt):
            self._feed(p, len(row.prompt) - p.done)
        assert p.logits is not None and p.state is not None
        self._join(p, p.logits, p.state, [])

    def _check(self, row: Row) -> None:
        if row.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {row.max_tokens}")
        if row.logprobs is not None and row.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {row.logprobs}")
        _check_tokens(row.prompt, self._vocab)
        if row.state is not None:
            row.state.check(self.model.config, batch_size=1)
        if not row.prompt:
            if row.state is None:
                raise ValueError("an empty prompt needs a state to continue from")
            raise ValueError("an empty prompt cannot be continued: feed at least one token")
        if row.logit_bias:
            ids = _check_tokens(list(row.logit_bias), self._vocab, "logit_bias")
            vals = torch.tensor([float(row.logit_bias[t]) for t in ids], dtype=torch.float32)
            row._bias = (torch.tensor(ids, dtype=torch.long), vals)
        row._from_zero = row.state is None

    def _start(self, p: _Prefill) -> None:
        """Before the first slice: the start state, or the longest cached prefix (not for echo rows,
        which need every prompt position's logits)."""
        row = p.row
        p.started = True
        p.state = row.state.clone() if row.state is not None else None
        if self.cache is not None and row.state is None and not row.echo:
            p.done, p.state, p.logits = self.cache.lookup(row.prompt)
            for r in p.rows:
                r.cached_tokens = p.done

    def _feed(self, p: _Prefill, n: int) -> None:
        """Feed the next ``n`` prompt tokens of ``p`` (scoring them for echo rows); when the prompt is
        complete, store it in the prefix cache."""
        row = p.row
        piece = row.prompt[p.done : p.done + n]
        if row.echo:
            k = row.logprobs or 0
            s = token_logprobs(self.model, piece, p.state, p.logits, top_n=k, chunk_len=self.chunk_len)
            p.lps += s.logprobs
            p.tops += s.top if s.top is not None else [None if lp is None else [] for lp in s.logprobs]
            p.logits, p.state = s.logits, s.state
        else:
            p.logits, p.state = prefill(self.model, piece, p.state, chunk_len=self.chunk_len)
        p.done += len(piece)
        if p.done == len(row.prompt) and self.cache is not None and row.state is None:
            self.cache.store(row.prompt, p.state, p.logits)

    def _join(self, p: _Prefill, logits: torch.Tensor, state: State, finished: list[Row]) -> None:
        """Add the rows of a prefilled prompt to the decoding batch (finished: those that want no tokens)."""
        lg = logits.reshape(1, -1).to(self._device)
        joining: list[Row] = []
        for r in p.rows:
            if r.echo:
                r.prompt_logprobs, r.prompt_top_logprobs = p.lps, p.tops
            if r.cancelled:
                self._finish(r, "cancelled", None, None)
                finished.append(r)
            elif r.max_tokens == 0:
                self._finish(r, "length", state.clone() if p.copies else state, logits)
                finished.append(r)
            else:
                joining.append(r)
        if not joining:
            return
        self.rows += joining
        parts = [state] * len(joining)
        self._state = State.stack(parts if self._state is None else [self._state, *parts])
        lgs = lg.expand(len(joining), -1)
        self._logits = lgs.clone() if self._logits is None else torch.cat([self._logits, lgs])

    @torch.no_grad()
    def _prefill_slice(self, finished: list[Row]) -> None:
        """Feed waiting prompts, in turn, ``interleave`` tokens in all (``chunk_len`` when no row is
        decoding): several short prompts, or one slice of a long one. Completed prompts join the batch."""
        for p in [p for p in self.prefilling if all(r.cancelled for r in p.rows)]:
            self.prefilling.remove(p)
            for r in p.rows:
                self._finish(r, "cancelled", None, None)
                finished.append(r)
        budget = self.interleave if self.rows else self.chunk_len
        while budget > 0 and self.prefilling:
            p = self.prefilling.pop(0)
            row = p.row
            try:
                if not p.started:
                    self._start(p)
                n = min(budget, len(row.prompt) - p.done)
                if n > 0:
                    self._feed(p, n)
                    budget -= n
            except Exception as e:  # noqa: BLE001 - a prompt the model rejects fails alone
                for r in p.rows:
                    r.finish_reason, r.error = "error", f"{type(e).__name__}: {e}"
                    finished.append(r)
                continue
            if p.done < len(row.prompt):
                self.prefilling.append(p)  # its budget is spent; the next waiting prompt goes first
                return
            assert p.logits is not None and p.state is not None
            self._join(p, p.logits, p.state, finished)

    def _finish(self, row: Row, reason: str, state: State | None, logits: torch.Tensor | None) -> None:
        """End ``row``; ``state``/``logits`` (when known) are those after its prompt and every emitted token."""
        row.finish_reason = reason
        if (
            state is not None
            and logits is not None
            and row.cache_end
            and row._from_zero
            and self.cache is not None
        ):
            self.cache.store(row.prompt + row.tokens, state, logits, copy=row.keep_state)
        row.state, row.logits = (state, logits) if row.keep_state else (None, None)

    @torch.no_grad()
    def step(self) -> list[Row]:
        """Prefill one slice of a waiting prompt (``interleave``), then emit one token for every
        decoding row; return the rows that finished in this step."""
        clock = self.clock
        tm, t0 = self.timings, clock()
        finished: list[Row] = []
        if self.prefilling:
            self._prefill_slice(finished)
            tm["prefill_s"] += clock() - t0
        if self.rows:
            self._decode(finished, tm, clock)
        tm["step_s"] += clock() - t0
        return finished

    def _decode(self, finished: list[Row], tm: dict[str, float], clock: Callable[[], float]) -> None:
        """One token for every decoding row (``step`` after its prompt slice)."""
        live = [i for i, r in enumerate(self.rows) if not r.cancelled]
        for r in self.rows:
            if r.cancelled:
                self._finish(r, "cancelled", None, None)
                finished.append(r)
        if len(live) < len(self.rows):
            self._keep(live)
            if not self.rows:
                return
        assert self._state is not None and self._logits is not None
        rows, raw = self.rows, self._logits
        tm["steps"] += 1
        tm["rows"] += len(rows)
        t = clock()
        toks = self._sample(rows, raw)
        t1 = clock()
        scored = self._score(rows, raw, toks)
        t2 = clock()
        tm["sample_s"] += t1 - t
        tm["score_s"] += t2 - t1
        feed: list[int] = []  # row indices whose new token goes through the model
        keep: list[int] = []  # rows still generating after this step
        for i, r in enumerate(rows):
            tok = toks[i]
            if tok in r.stop_tokens:
                end = r._needs_end_state
                self._finish(
                    r, "stop", self._state.select(i) if end else None, raw[i].clone() if end else None
                )
                finished.append(r)
                continue
            r.tokens.append(tok)
            if i in scored:
                r.token_logprobs.append(scored[i][0])
                r.top_logprobs.append(scored[i][1])
            stop = bool(r.on_token(tok)) if r.on_token is not None else False
            if stop or len(r.tokens) >= r.max_tokens:
                r.finish_reason = "stop" if stop else "length"
                finished.append(r)
                if not r._needs_end_state:
                    self._finish(r, r.finish_reason, None, None)
                    continue
            feed.append(i)
            if not r.done:
                keep.append(i)
        t3 = clock()
        tm["emit_s"] += t3 - t2
        if feed:
            state = self._state if len(feed) == len(rows) else self._state.select(feed)
            x = torch.tensor([toks[i] for i in feed], dtype=torch.long, device=self._device).reshape(-1, 1)
            out, state = self.model(x, state)
            new_logits = out[:, -1]
            tm["model_s"] += clock() - t3
            for j, i in enumerate(feed):
                r = rows[i]
                if r.done:
                    self._finish(r, r.finish_reason or "stop", state.select(j), new_logits[j].clone())
            pos = [j for j, i in enumerate(feed) if not rows[i].done]
            if len(pos) == len(feed):
                self._state, self._logits = state, new_logits
            elif pos:
                self._state, self._logits = (
                    state.select(pos),
                    new_logits[torch.tensor(pos, device=self._device)],
                )
        self.rows = [rows[i] for i in keep]
        if not self.rows:
            self._state, self._logits = None, None

    def _sample(self, rows: list[Row], raw: torch.Tensor) -> list[int]:
        """One token per row, drawn together (``sampling.draw_rows``) from a CPU copy of the logits with
        each row's ``logit_bias`` added; the samplers record them."""
        x = raw.detach().to("cpu", torch.float32, copy=True)
        for i, r in enumerate(rows):
            if r._bias is not None:
                x[i].index_add_(0, r._bias[0], r._bias[1])
        toks = draw_rows(x, [r.sampler for r in rows], inplace=True)
        for r, t in zip(rows, toks):
            r.sampler.update(t)
        return toks

    def _score(self, rows: list[Row], raw: torch.Tensor, toks: list[int]) -> dict[int, tuple[float, TopN]]:
        """Log-probabilities (and top-k) of the sampled tokens of the rows that record them, in one
        ``score_logits`` call over those rows' raw logits."""
        want = [i for i, r in enumerate(rows) if r.logprobs is not None and toks[i] not in r.stop_tokens]
        if not want:
            return {}
        k = max(rows[i].logprobs or 0 for i in want)
        idx = torch.tensor(want, device=raw.device)
        tgt = torch.tensor([toks[i] for i in want], device=raw.device)
        lp, _, top = score_logits(raw.index_select(0, idx).float(), tgt, top_n=k)
        lps = lp.tolist()
        if top is None:
            return {i: (lps[j], []) for j, i in enumerate(want)}
        vals, ids = top[0].tolist(), top[1].tolist()
        out = {}
        for j, i in enumerate(want):
            n = rows[i].logprobs or 0
            out[i] = (lps[j], list(zip(ids[j][:n], vals[j][:n])))
        return out

    def _keep(self, idx: list[int]) -> None:
        self.rows = [self.rows[i] for i in idx]
        if not idx:
            self._state, self._logits = None, None
            return
        assert self._state is not None and self._logits is not None
        self._state = self._state.select(idx)
        self._logits = self._logits[torch.tensor(idx, device=self._logits.device)]
