"""Generation over the recurrent state: chunked prefill, batched decode, streaming text.

Layers, from the bottom up (each usable alone):

- ``prefill``, ``PrefixCache``, ``Row``, ``BatchDecoder`` (``rwkvkit.decoder``, re-exported here):
  chunked prefill, the LRU cache of states after token sequences, and the token-level engine that
  decodes many rows with one ``[B, 1]`` forward per step (optionally scoring what it emits).
- ``generate_tokens`` / ``generate_tokens_batch``: one or several prompts, token ids in and out.
- ``TextStream`` + ``generate`` / ``generate_batch``: text in, streamed text out, through the
  tokenizer's incremental decoder (no half characters) with stop strings held back until decided.

The state after a generation (``.state``) is the state after the prompt and every emitted token,
so continuing from it (a chat's next turn, a saved conversation) is exact.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from .decoder import (
    DEFAULT_CHUNK_LEN,
    BatchDecoder,
    PrefixCache,
    Row,
    _vocab_size,
    prefill,
    prefill_cached,
)
from .sampling import Sampler, SamplingParams
from .scoring.tokens import check_tokens
from .state import State

__all__ = [
    "DEFAULT_CHUNK_LEN", "BatchDecoder", "PrefixCache", "Row", "TextGeneration", "TextStream", "TokenStream",
    "generate", "generate_batch", "generate_tokens", "generate_tokens_batch", "penalty_weights", "prefill",
    "prefill_cached",
]  # fmt: skip


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
    logits: torch.Tensor | None = None,
) -> Row:
    V = _vocab_size(model)
    return Row(
        prompt=check_tokens(prompt, V),
        sampler=Sampler(params, V, weights),
        max_tokens=int(max_tokens),
        stop_tokens=frozenset(int(t) for t in stop_tokens),
        state=state.clone() if state is not None else None,
        keep_state=keep_state,
        start_logits=logits,
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

    @property
    def logits(self) -> torch.Tensor | None:
        """The next-token logits that go with ``state`` (continue with both: ``logits=``)."""
        return self.row.logits if self.row.done else None


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
    logits: torch.Tensor | None = None,
) -> TokenStream:
    """Continue ``prompt`` (token ids) from ``state``; iterate the result for token ids as they come.
    ``logits``: the next-token logits that go with ``state`` (an earlier generation's ``.logits``);
    with them ``prompt`` may be empty, and decoding continues exactly where that generation ended."""
    row = _make_row(
        model, prompt, sampling or SamplingParams(), max_tokens, stop_tokens, state, weights, True, logits
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

    @property
    def logits(self) -> torch.Tensor | None:
        return self._tokens.logits


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
    logits: torch.Tensor | None = None,
) -> TextGeneration | str:
    """Continue ``prompt`` with ``model``.

    ``stream=True`` returns a ``TextGeneration``: iterate it for text pieces as they are produced,
    then read ``.text``, ``.tokens``, ``.finish_reason``, ``.state`` and ``.logits`` (to continue
    later: ``generate(model, tok, "", state=g.state, logits=g.logits)`` goes on exactly where ``g``
    stopped; a new prompt with ``state`` alone goes on after it).
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
        logits=logits,
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
