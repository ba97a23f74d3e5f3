"""The token-level engine under ``rwkvkit.generate`` and the server: the batched decoder.

Prefill and the prefix cache live in ``rwkvkit.prefill``, the rows in ``rwkvkit.row`` (re-exported here). The decoder stores every
prompt it prefills in its ``PrefixCache`` and, for rows that ask (``Row.cache_end``), the state after
the prompt and every emitted token: a chat's next turn, whose prompt is this turn's prompt + reply +
the new message, then costs only the new message.

``BatchDecoder``: rows (``Row``) join after their own prefill, all active rows are decoded together
with one ``[B, 1]`` forward per step (one weight read serves every row), and each row leaves when it
hits a stop token, its token budget, its ``on_token`` hook says stop, or it is cancelled. It knows
nothing about text; the server drives it from a thread. With ``interleave=N`` a new row's prompt is
not prefilled by ``add`` but by the following ``step`` calls, N prompt tokens per step in all while
other rows are decoding (several short prompts, or a slice of a long one; waiting prompts take
turns), so a long prompt arriving never stalls the running streams for longer than N tokens'
prefill; with nothing decoding a step prefills ``chunk_len`` tokens. ``add(row, copies=[...])``
prefills one prompt once for several rows (n choices of one prompt): each copy joins the batch with
its own copy of the state.

How waiting prompts enter the batch (slices of prefill, prompts fed together on an idle decoder,
riding the decode step) is ``rwkvkit.admission``'s part of ``BatchDecoder``.

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
from collections.abc import Callable, Sequence

import torch

from .admission import Admission
from .prefill import DEFAULT_CHUNK_LEN, PrefixCache, model_device, prefill, prefill_cached
from .row import PromptFeed, Row, TopN
from .sampling import draw_rows
from .scoring import score_logits
from .scoring.tokens import check_tokens
from .state import State

__all__ = ["DEFAULT_CHUNK_LEN", "TIMINGS", "BatchDecoder", "PrefixCache", "Row", "prefill", "prefill_cached"]

# ``BatchDecoder.timings``: decode steps and rows decoded (counts), then seconds spent in ``step``:
# prompt slices, sampling (logits copy, bias, draws), logprobs, the per-row loop (bookkeeping and the
# rows' on_token hooks: the server's text decoding), the [B, 1] model forward, and the whole step.
TIMINGS = ("steps", "rows", "prefill_s", "sample_s", "score_s", "emit_s", "model_s", "step_s")


def _vocab_size(model: torch.nn.Module) -> int:
    return int(model.config.vocab_size)


# ---- the batched decoder --------------------------------------------------------------------------
class BatchDecoder(Admission):
    """Decode many rows together: one ``[B, 1]`` forward per step over a stacked State."""

    def __init__(self, model: torch.nn.Module, *, chunk_len: int = DEFAULT_CHUNK_LEN,
                 cache: PrefixCache | None = None, interleave: int = 0, ride: int = 0) -> None:  # fmt: skip
        if chunk_len <= 0 or interleave < 0 or ride < 0:
            raise ValueError(
                f"chunk_len must be positive, interleave and ride >= 0, got {chunk_len}, {interleave}, {ride}"
            )
        self.ride = ride if interleave else 0
        self.model = model
        self.chunk_len = chunk_len
        self.cache = cache
        self.interleave = interleave
        self.rows: list[Row] = []
        self.prefilling: list[
            PromptFeed
        ] = []  # prompts still being prefilled (interleave > 0), in turn order
        self._state: State | None = None  # stacked state of self.rows
        self._logits: torch.Tensor | None = None  # [B, V] next-token logits of self.rows
        self._device = model_device(model)
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
        p = PromptFeed(row, copies=list(copies))
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
        check_tokens(row.prompt, self._vocab)
        if row.state is not None:
            row.state.check(self.model.config, batch_size=1)
        if not row.prompt:
            if row.state is None:
                raise ValueError("an empty prompt needs a state to continue from")
            if row.start_logits is None:
                raise ValueError(
                    "an empty prompt continues from a state only with the next-token logits that go with it "
                    "(a generation's .logits); pass them, or feed at least one token"
                )
            if tuple(row.start_logits.shape) != (self._vocab,):
                raise ValueError(
                    f"start logits must be [{self._vocab}] (the model's vocabulary), got {tuple(row.start_logits.shape)}"
                )
        if row.logit_bias:
            ids = check_tokens(list(row.logit_bias), self._vocab, "logit_bias")
            vals = torch.tensor([float(row.logit_bias[t]) for t in ids], dtype=torch.float32)
            row._bias = (torch.tensor(ids, dtype=torch.long), vals)
        row._from_zero = row.state is None

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
        emitting = [i for i, r in enumerate(rows) if not r._ride]  # the others feed a prompt token
        tm["steps"] += 1
        tm["rows"] += len(emitting)
        t = clock()
        toks: list[int] = [0] * len(rows)
        scored: dict[int, tuple[float, TopN]] = {}
        if len(emitting) == len(rows):
            toks = self._sample(rows, raw)
            t1 = clock()
            scored = self._score(rows, raw, toks)
        elif emitting:
            sub_rows, sub_raw = [rows[i] for i in emitting], raw[torch.tensor(emitting, device=raw.device)]
            sub = self._sample(sub_rows, sub_raw)
            t1 = clock()
            for j, i in enumerate(emitting):
                toks[i] = sub[j]
            scored = {emitting[j]: v for j, v in self._score(sub_rows, sub_raw, sub).items()}
        else:
            t1 = clock()
        t2 = clock()
        tm["sample_s"] += t1 - t
        tm["score_s"] += t2 - t1
        feed: list[int] = []  # row indices whose new token goes through the model
        keep: list[int] = []  # rows still generating after this step
        boarded: list[int] = []  # riding rows whose last prompt token goes in now
        for i, r in enumerate(rows):
            if r._ride:
                toks[i] = r._ride.pop(0)
                if not r._ride:
                    boarded.append(i)
                feed.append(i)
                keep.append(i)
                continue
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
            if boarded and self.cache is not None:
                for i in boarded:  # a prompt fed through the step is cached as a prefilled one is
                    if rows[i]._from_zero:
                        j = feed.index(i)
                        self.cache.store(rows[i].prompt, state.select(j), new_logits[j].clone(), copy=False)
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
