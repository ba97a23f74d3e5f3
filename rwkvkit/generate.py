"""Generation over the recurrent state: chunked prefill, batched decode, streaming text.

Layers, from the bottom up (each usable alone):

- ``prefill``: run a prompt through the model in chunks of ``chunk_len`` tokens with the parallel
  form, keeping only the last position's logits (``last_only=True``).
- ``PrefixCache``: an LRU map prompt-prefix -> (State, next-token logits). A prompt that extends a
  cached one (the next turn of a chat, a shared system prompt) only prefills the new tokens.
- ``BatchDecoder``: the token-level engine. Rows (``Row``) join after their own prefill, all active
  rows are decoded together with one ``[B, 1]`` forward per step (one weight read serves every
  row), and each row leaves when it hits a stop token, its token budget, its ``on_token`` hook says
  stop, or it is cancelled. It knows nothing about text; the server drives it from a thread.
  With ``interleave=N`` a new row's prompt is not prefilled by ``add`` but by the following
  ``step`` calls, N prompt tokens per step in all while other rows are decoding (several short
  prompts, or a slice of a long one; waiting prompts take turns), so a long prompt arriving never
  stalls the running streams for longer than N tokens' prefill; with nothing decoding a step
  prefills ``chunk_len`` tokens.
- ``generate_tokens`` / ``generate_tokens_batch``: one or several prompts, token ids in and out.
- ``TextStream`` + ``generate`` / ``generate_batch``: text in, streamed text out, through the
  tokenizer's incremental decoder (no half characters) with stop strings held back until decided.

The state after a generation (``.state``) is the state after the prompt and every emitted token,
so continuing from it (a chat's next turn, a saved conversation) is exact.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .sampling import Sampler, SamplingParams
from .state import State

DEFAULT_CHUNK_LEN = 256


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


class PrefixCache:
    """LRU cache of prompt-prefix -> (State, next-token logits), for prompts that start from zero state.

    ``lookup`` returns the longest cached prefix of a prompt; entries are cloned on the way in and
    out, so callers may modify what they get. ``hits`` and ``tokens_saved`` count its use.
    """

    def __init__(self, max_entries: int = 16) -> None:
        if max_entries <= 0:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], tuple[State, torch.Tensor]] = OrderedDict()
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
            if k <= n and (best is None or k > len(best)) and tuple(tokens[:k]) == key:
                best = key
        if best is None:
            return 0, None, None
        self._entries.move_to_end(best)
        state, logits = self._entries[best]
        self.hits += 1
        self.tokens_saved += len(best)
        return len(best), state.clone(), logits.clone()

    def store(self, tokens: Sequence[int], state: State, logits: torch.Tensor) -> None:
        key = tuple(int(t) for t in tokens)
        if not key:
            return
        self._entries[key] = (state.clone(), logits.detach().clone())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


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


# ---- the token-level engine ----------------------------------------------------------------------
@dataclass(eq=False)
class Row:
    """One sequence being generated. ``tokens`` grows as the engine emits; ``finish_reason`` ends it.

    ``on_token(token) -> bool`` is called with every emitted token; returning True stops the row
    (finish reason "stop") after that token. Setting ``cancelled`` (from any thread) drops the row
    at the next step. With ``keep_state`` the engine leaves the final state in ``state``.
    """

    prompt: list[int]
    sampler: Sampler
    max_tokens: int
    stop_tokens: frozenset[int] = frozenset()
    state: State | None = None  # the initial state (None = the model's); the final one with keep_state
    on_token: Callable[[int], bool] | None = None
    keep_state: bool = False
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    cancelled: bool = False
    error: str | None = None  # why, when finish_reason is "error" (its prefill failed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class _Prefill:
    """A row whose prompt is being prefilled a slice at a time (``BatchDecoder(interleave=N)``)."""

    row: Row
    done: int = 0  # prompt tokens fed so far
    state: State | None = None  # the state after them (None: not started, the row's own start state)
    logits: torch.Tensor | None = None
    started: bool = False


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
        self.prefilling: list[_Prefill] = []  # rows still being prefilled (interleave > 0), in turn order
        self._state: State | None = None  # stacked state of self.rows
        self._logits: torch.Tensor | None = None  # [B, V] next-token logits of self.rows
        self._device = _device(model)

    def __len__(self) -> int:
        return len(self.rows) + len(self.prefilling)

    def add(self, row: Row) -> None:
        """Check ``row`` and prefill its prompt (now, or over the next steps with ``interleave``); it joins
        the decoding batch when its prompt is done."""
        if row.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {row.max_tokens}")
        _check_tokens(row.prompt, _vocab_size(self.model))
        if row.state is not None:
            row.state.check(self.model.config, batch_size=1)
        if not row.prompt:
            if row.state is None:
                raise ValueError("an empty prompt needs a state to continue from")
            raise ValueError("an empty prompt cannot be continued: feed at least one token")
        if self.interleave:
            self.prefilling.append(_Prefill(row))
            return
        logits, state = prefill_cached(
            self.model, row.prompt, row.state, chunk_len=self.chunk_len, cache=self.cache
        )
        self._join(row, logits, state)

    def _join(self, row: Row, logits: torch.Tensor, state: State) -> bool:
        """Add a prefilled row to the decoding batch; False (finished) if it wants no tokens."""
        if row.max_tokens == 0:
            self._finish(row, "length", state)
            return False
        self.rows.append(row)
        self._state = state if self._state is None else State.stack([self._state, state])
        lg = logits.reshape(1, -1).to(self._device)
        self._logits = lg if self._logits is None else torch.cat([self._logits, lg])
        return True

    @torch.no_grad()
    def _prefill_slice(self, finished: list[Row]) -> None:
        """Feed waiting prompts, in turn, ``interleave`` tokens in all (``chunk_len`` when no row is
        decoding): several short prompts, or one slice of a long one. Completed prompts join the batch."""
        for p in [p for p in self.prefilling if p.row.cancelled]:
            self.prefilling.remove(p)
            self._finish(p.row, "cancelled", None)
            finished.append(p.row)
        budget = self.interleave if self.rows else self.chunk_len
        while budget > 0 and self.prefilling:
            p = self.prefilling.pop(0)
            row = p.row
            try:
                if not p.started:
                    p.started = True
                    p.state = row.state.clone() if row.state is not None else None
                    if self.cache is not None and row.state is None:
                        p.done, p.state, p.logits = self.cache.lookup(row.prompt)
                end = min(p.done + budget, len(row.prompt))
                if p.done < end:
                    p.logits, p.state = prefill(
                        self.model, row.prompt[p.done : end], p.state, chunk_len=self.chunk_len
                    )
                    budget -= end - p.done
                    p.done = end
                    if end == len(row.prompt) and self.cache is not None and row.state is None:
                        self.cache.store(row.prompt, p.state, p.logits)
            except Exception as e:  # noqa: BLE001 - a prompt the model rejects fails alone
                row.finish_reason, row.error = "error", f"{type(e).__name__}: {e}"
                finished.append(row)
                continue
            if p.done < len(row.prompt):
                self.prefilling.append(p)  # its budget is spent; the next waiting prompt goes first
                return
            assert p.logits is not None and p.state is not None
            if not self._join(row, p.logits, p.state):
                finished.append(row)

    def _finish(self, row: Row, reason: str, state: State | None) -> None:
        row.finish_reason = reason
        row.state = state if row.keep_state else None

    @torch.no_grad()
    def step(self) -> list[Row]:
        """Prefill one slice of a waiting prompt (``interleave``), then emit one token for every
        decoding row; return the rows that finished in this step."""
        finished: list[Row] = []
        if self.prefilling:
            self._prefill_slice(finished)
        if not self.rows:
            return finished
        assert self._state is not None and self._logits is not None
        live = [i for i, r in enumerate(self.rows) if not r.cancelled]
        for r in self.rows:
            if r.cancelled:
                self._finish(r, "cancelled", None)
                finished.append(r)
        if len(live) < len(self.rows):
            self._keep(live)
            if not self.rows:
                return finished
        assert self._state is not None and self._logits is not None
        logits = self._logits.float().cpu()
        feed: list[int] = []  # row indices whose new token goes through the model
        feed_tokens: list[int] = []
        keep: list[int] = []  # rows still generating after this step
        for i, r in enumerate(self.rows):
            tok = r.sampler(logits[i])
            if tok in r.stop_tokens:
                self._finish(r, "stop", self._state.select(i) if r.keep_state else None)
                finished.append(r)
                continue
            r.tokens.append(tok)
            stop = bool(r.on_token(tok)) if r.on_token is not None else False
            if stop or len(r.tokens) >= r.max_tokens:
                r.finish_reason = "stop" if stop else "length"
                finished.append(r)
                if not r.keep_state:
                    r.state = None
                    continue
            feed.append(i)
            feed_tokens.append(tok)
            if not r.done:
                keep.append(i)
        if feed:
            state = self._state if len(feed) == len(self.rows) else self._state.select(feed)
            x = torch.tensor(feed_tokens, dtype=torch.long, device=self._device).reshape(-1, 1)
            out, state = self.model(x, state)
            new_logits = out[:, -1]
            for j, i in enumerate(feed):
                r = self.rows[i]
                if r.done:
                    r.state = state.select(j)
            pos = [feed.index(i) for i in keep]
            if len(pos) == len(feed):
                self._state, self._logits = state, new_logits
            elif pos:
                self._state, self._logits = (
                    state.select(pos),
                    new_logits[torch.tensor(pos, device=self._device)],
                )
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self._state, self._logits = None, None
        return finished

    def _keep(self, idx: list[int]) -> None:
        self.rows = [self.rows[i] for i in idx]
        if not idx:
            self._state, self._logits = None, None
            return
        assert self._state is not None and self._logits is not None
        self._state = self._state.select(idx)
        self._logits = self._logits[torch.tensor(idx, device=self._logits.device)]


def penalty_weights(tokenizer: object, vocab_size: int) -> torch.Tensor:
    """Per-token occurrence weight as in the reference: 0 for tokens whose text is a substring of
    ``" \\t0123456789"`` (whitespace, digits), 1 for every other token.

    The reference tests ``decode([token]) in " \\t0123456789"`` for every generated token. The
    tokens that pass are exactly the single-token encodings of that string's substrings (greedy
    longest match encodes a token's own text as that token), so 78 encodes replace 65536 decodes.
    """
    cached = _WEIGHTS.get(tokenizer) if _weakrefable(tokenizer) else None
    if cached is not None and cached.numel() == vocab_size:
        return cached
    w = torch.ones(vocab_size, dtype=torch.float32)
    chars = " \t0123456789"
    for i in range(len(chars)):
        for j in range(i + 1, len(chars) + 1):
            ids = tokenizer.encode(chars[i:j])  # type: ignore[attr-defined]
            if len(ids) == 1 and 0 <= ids[0] < vocab_size and tokenizer.decode(ids) == chars[i:j]:  # type: ignore[attr-defined]
                w[ids[0]] = 0.0
    if _weakrefable(tokenizer):
        _WEIGHTS[tokenizer] = w
    return w


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weakrefable(obj: object) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _make_row(
    model: torch.nn.Module,
    prompt: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop_tokens: Sequence[int],
    state: State | None,
    weights: torch.Tensor | None,
    keep_state: bool,
) -> Row:
    V = _vocab_size(model)
    return Row(
        prompt=_check_tokens(prompt, V),
        sampler=Sampler(params, V, weights),
        max_tokens=int(max_tokens),
        stop_tokens=frozenset(int(t) for t in stop_tokens),
        state=state.clone() if state is not None else None,
        keep_state=keep_state,
    )


class TokenStream:
    """Iterate over generated token ids; afterwards ``finish_reason`` and ``state`` are set."""

    def __init__(self, decoder: BatchDecoder, row: Row) -> None:
        self._decoder, self.row = decoder, row
        self._added = False

    def __iter__(self) -> Iterator[int]:
        if not self._added:
            self._added = True
            self._decoder.add(self.row)
        sent = 0
        while True:
            while sent < len(self.row.tokens):
                sent += 1
                yield self.row.tokens[sent - 1]
            if self.row.done:
                return
            self._decoder.step()

    @property
    def tokens(self) -> list[int]:
        return self.row.tokens

    @property
    def finish_reason(self) -> str | None:
        return self.row.finish_reason

    @property
    def state(self) -> State | None:
        return self.row.state if self.row.done else None


def generate_tokens(
    model: torch.nn.Module,
    prompt: Sequence[int],
    *,
    max_tokens: int = 100,
    sampling: SamplingParams | None = None,
    stop_tokens: Sequence[int] = (),
    state: State | None = None,
    weights: torch.Tensor | None = None,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    cache: PrefixCache | None = None,
    on_token: Callable[[int], bool] | None = None,
) -> TokenStream:
    """Continue ``prompt`` (token ids) from ``state``; iterate the result for token ids as they come."""
    row = _make_row(
        model, prompt, sampling or SamplingParams(), max_tokens, stop_tokens, state, weights, True
    )
    row.on_token = on_token
    return TokenStream(BatchDecoder(model, chunk_len=chunk_len, cache=cache), row)


def generate_tokens_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int | Sequence[int] = 100,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_tokens: Sequence[int] = (),
    states: Sequence[State | None] | None = None,
    weights: torch.Tensor | None = None,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    cache: PrefixCache | None = None,
    keep_state: bool = False,
) -> list[Row]:
    """Generate for several prompts of any lengths at once; rows finish independently. Returns the rows."""
    n = len(prompts)
    params = _per_row(sampling or SamplingParams(), n, "sampling")
    budgets = _per_row(max_tokens, n, "max_tokens")
    init = list(states) if states is not None else [None] * n
    if len(init) != n:
        raise ValueError(f"got {len(init)} states for {n} prompts")
    dec = BatchDecoder(model, chunk_len=chunk_len, cache=cache)
    rows = [
        _make_row(model, p, params[i], budgets[i], stop_tokens, init[i], weights, keep_state)
        for i, p in enumerate(prompts)
    ]
    for r in rows:
        dec.add(r)
    while len(dec):
        dec.step()
    return rows


def _per_row(value: object, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


# ---- text ------------------------------------------------------------------------------------------
class _FallbackStreamDecoder:
    """For tokenizers without ``stream_decoder``: re-decode the pending ids until no U+FFFD remains."""

    def __init__(self, tokenizer: object) -> None:
        self._decode = tokenizer.decode  # type: ignore[attr-defined]
        self._pending: list[int] = []

    def feed(self, ids: Sequence[int]) -> str:
        self._pending += list(ids)
        text = self._decode(self._pending)
        if "\ufffd" in text:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        text = self._decode(self._pending) if self._pending else ""
        self._pending = []
        return text


class TextStream:
    """Turn emitted token ids into text pieces: complete characters only, stop strings held back.

    ``feed(token)`` returns the text that is now safe to show; once a stop string appears,
    ``stopped`` is True and the text before it is the last piece. ``finish()`` returns what was held.
    """

    def __init__(self, tokenizer: object, stop: Sequence[str] = ()) -> None:
        make = getattr(tokenizer, "stream_decoder", None)
        self._decoder = make() if callable(make) else _FallbackStreamDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self._held = ""
        self.text = ""
        self.stopped = False

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        return self._push(self._decoder.feed([token]))

    def _push(self, piece: str) -> str:
        buf = self._held + piece
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return self._emit(buf[:cut])
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return self._emit(buf[: len(buf) - hold])

    def _emit(self, s: str) -> str:
        self.text += s
        return s

    def finish(self) -> str:
        if self.stopped:
            return ""
        out = self._push(self._decoder.flush())
        if not self.stopped:
            out += self._emit(self._held)
            self._held = ""
        return out


class TextGeneration:
    """Iterate for text pieces as they are produced; then ``text``, ``tokens``, ``finish_reason``, ``state``.

    Stop strings are checked inside the engine (the row's ``on_token`` hook), so generation ends on
    the token that completed a stop string, and the state includes exactly the emitted tokens.
    """

    def __init__(self, tokens: TokenStream, text: TextStream, n_prompt: int) -> None:
        self._tokens, self._text = tokens, text
        self.prompt_tokens = n_prompt
        self._pending: list[str] = []
        tokens.row.on_token = self._on_token

    def _on_token(self, tok: int) -> bool:
        piece = self._text.feed(tok)
        if piece:
            self._pending.append(piece)
        return self._text.stopped

    def __iter__(self) -> Iterator[str]:
        for _tok in self._tokens:
            while self._pending:
                yield self._pending.pop(0)
        while self._pending:
            yield self._pending.pop(0)
        tail = self._text.finish()
        if tail:
            yield tail

    @property
    def text(self) -> str:
        return self._text.text

    @property
    def tokens(self) -> list[int]:
        return self._tokens.tokens

    @property
    def finish_reason(self) -> str | None:
        return self._tokens.finish_reason

    @property
    def state(self) -> State | None:
        return self._tokens.state


def generate(
    model: torch.nn.Module,
    tokenizer: object,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 100,
    sampling: SamplingParams | None = None,
    stop: str | Sequence[str] = (),
    stop_tokens: Sequence[int] = (0,),
    state: State | None = None,
    stream: bool = True,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    cache: PrefixCache | None = None,
) -> TextGeneration | str:
    """Continue ``prompt`` with ``model``.

    ``stream=True`` returns a ``TextGeneration``: iterate it for text pieces as they are produced,
    then read ``.text``, ``.tokens``, ``.finish_reason`` and ``.state`` (to continue later).
    ``stream=False`` returns the whole text. ``stop`` strings end generation and are not included;
    token 0 (end of document) stops by default. ``state`` is not modified.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)  # type: ignore[attr-defined]
    stops = [stop] if isinstance(stop, str) else list(stop)
    text = TextStream(tokenizer, stops)
    weights = penalty_weights(tokenizer, _vocab_size(model))
    toks = generate_tokens(
        model,
        ids,
        max_tokens=max_tokens,
        sampling=sampling,
        stop_tokens=stop_tokens,
        state=state,
        weights=weights,
        chunk_len=chunk_len,
        cache=cache,
    )
    gen = TextGeneration(toks, text, len(ids))
    if stream:
        return gen
    for _ in gen:
        pass
    return gen.text


def generate_batch(
    model: torch.nn.Module,
    tokenizer: object,
    prompts: Sequence[str],
    *,
    max_tokens: int = 100,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop: str | Sequence[str] = (),
    stop_tokens: Sequence[int] = (0,),
    chunk_len: int = DEFAULT_CHUNK_LEN,
) -> list[str]:
    """Complete several prompts together (batched decode); returns one text per prompt."""
    stops = [stop] if isinstance(stop, str) else list(stop)
    n = len(prompts)
    params = _per_row(sampling or SamplingParams(), n, "sampling")
    weights = penalty_weights(tokenizer, _vocab_size(model))
    dec = BatchDecoder(model, chunk_len=chunk_len)
    texts = [TextStream(tokenizer, stops) for _ in range(n)]
    for i, p in enumerate(prompts):
        row = _make_row(model, tokenizer.encode(p), params[i], max_tokens, stop_tokens, None, weights, False)  # type: ignore[attr-defined]
        ts = texts[i]
        row.on_token = lambda tok, ts=ts: (ts.feed(tok), ts.stopped)[1]
        dec.add(row)
    while len(dec):
        dec.step()
    for ts in texts:
        ts.finish()
    return [ts.text for ts in texts]
