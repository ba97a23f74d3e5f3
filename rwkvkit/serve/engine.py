"""The decode engine: one background thread owns the model and serves every request's rows.

It admits waiting groups (one prompt's n choices: rows prefilled once, each decoding on its own) up to
``max_batch`` rows and steps them with ``rwkvkit.decoder.BatchDecoder`` in interleaved mode: each step
feeds at most ``prefill_slice`` tokens of waiting prompts (waiting prompts take turns), then decodes
every active row together with one ``[B, 1]`` forward; prompts with at most ``ride_tokens`` tokens left
ride that forward instead, a token per step (``rwkvkit.decoder``: riding). Woken from idle by a request,
it keeps admitting for as long as more follow within ``burst_ms`` (8 gaps at most): a burst's short
prompts are then prefilled together, in one forward (``rwkvkit.decoder``: together). A long prompt therefore delays the running
streams by one slice's prefill per token, not by its whole prefill. Rows leave when finished or when
their client goes (``Row.cancelled``, set from the HTTP side). When the engine runs out of work it
hands freed heap memory back to the system (``rwkvkit.runtime.trim_malloc``), so the resident size
levels off under sustained load even with ``tune_malloc``'s high thresholds.

The prefix cache (``PrefixCache``, bounded to ``cache_entries`` entries and ``cache_bytes`` bytes of
states) holds the state after every prompt prefilled and after every reply whose row asks for it
(``Row.cache_end``: chat replies), so a chat's next turn prefills only its new tokens.

A ``Job`` is one row's bridge to asyncio: the engine thread pushes ``(index, "text", (piece,
n_tokens))``, ``(index, "done", (finish_reason, n_tokens))`` or ``(index, "error", message)`` into its
request's queue; ``n_tokens`` is how many tokens the row had emitted when the text was released (the
handler sends their log-probabilities with it). The engine gathers a step's events and hands them to
the event loop with one ``call_soon_threadsafe`` after the step, not one per token: each call wakes
the loop (a write to its self-pipe) and hands the GIL over, 16 times a step at 16 rows.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

import torch

from ..decoder import TIMINGS, BatchDecoder, PrefixCache, Row
from ..generation import TextStream
from ..runtime import trim_malloc

CACHE_ENTRIES = 32
CACHE_BYTES = 256 << 20
RIDE_TOKENS = 16  # prompts with at most this many tokens left ride the decode step (decoder.py)
BURST_MS = 5.0  # an idle engine woken by a request keeps admitting while others follow this close


class Job:
    """One row (one choice of a request) plus the channel its text goes back through: the request's
    asyncio queue, shared by its choices, events tagged with the choice's ``index``."""

    def __init__(self, row: Row, text: TextStream, loop: asyncio.AbstractEventLoop, index: int = 0,
                 queue: asyncio.Queue | None = None) -> None:  # fmt: skip
        self.row, self.text, self.loop, self.index = row, text, loop, index
        self.queue: asyncio.Queue = queue if queue is not None else asyncio.Queue()
        self.outbox: list[tuple[Job, str, Any]] | None = None  # the engine's, once it holds the job
        row.on_token = self._on_token

    def push(self, kind: str, value: Any) -> None:
        if self.outbox is not None:  # delivered with the rest of the step's events (Engine._flush)
            self.outbox.append((self, kind, value))
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.row.cancelled = True

    def cancel(self) -> None:
        """The client went away: the engine drops the row at its next step."""
        if not self.row.done:
            self.row.cancelled = True

    def _on_token(self, token: int) -> bool:
        piece = self.text.feed(token)
        if piece:
            self.push("text", (piece, len(self.row.tokens)))
        return self.text.stopped

    def finish(self) -> None:
        if self.row.finish_reason == "error":
            self.fail(self.row.error or "generation failed")
            return
        n = len(self.row.tokens)
        if self.row.finish_reason != "cancelled":
            tail = self.text.finish()
            if tail:
                self.push("text", (tail, n))
        self.push("done", (self.row.finish_reason, n))
        self.release()

    def fail(self, message: str) -> None:
        self.push("error", message)
        self.release()

    def release(self) -> None:
        """Break the row -> hook -> job cycle once the row is over, so that reference counting frees
        the request's tensors (sampler counts, logits) as soon as its handler is done, instead of
        whenever the cyclic garbage collector next runs (the server's memory grew round after round)."""
        self.row.on_token = None


def _deliver(events: list[tuple[Job, str, Any]]) -> None:
    """On the event loop: put a step's events into their requests' queues, in order."""
    for job, kind, value in events:
        job.queue.put_nowait((job.index, kind, value))


class QueueFull(Exception):
    pass


class Engine:
    """The background decode loop: admits waiting groups of jobs up to ``max_batch`` rows and steps them
    together. ``max_queue`` bounds the rows waiting to be admitted."""

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 16, max_queue: int = 64, chunk_len: int = 256,
                 cache_entries: int = CACHE_ENTRIES, cache_bytes: int | None = CACHE_BYTES,
                 prefill_slice: int = 32, ride_tokens: int = RIDE_TOKENS, burst_ms: float = BURST_MS) -> None:  # fmt: skip
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.chunk_len, self.prefill_slice, self.ride_tokens = chunk_len, prefill_slice, ride_tokens
        if burst_ms < 0:
            raise ValueError(f"burst_ms must be >= 0, got {burst_ms}")
        self.burst_s = burst_ms / 1000
        self.cache = PrefixCache(cache_entries, cache_bytes)
        self.timings = dict.fromkeys(TIMINGS, 0.0)  # the decoder's (decoder.TIMINGS), kept across decoders
        self.decoder = self._decoder(self.cache)
        self._waiting: deque[list[Job]] = deque()
        self._waiting_rows = 0
        self._jobs: dict[Row, Job] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="rwkvkit-engine", daemon=True)
        self.steps = 0
        self.max_rows_seen = 0
        self._outbox: list[tuple[Job, str, Any]] = []  # the events of this step, for Engine._flush

    def _decoder(self, cache: PrefixCache | None) -> BatchDecoder:
        dec = BatchDecoder(
            self.model,
            chunk_len=self.chunk_len,
            cache=cache,
            interleave=self.prefill_slice,
            ride=self.ride_tokens,
        )
        dec.timings = self.timings
        return dec

    def stats(self) -> dict:
        """What ``/health`` reports: rows, the decoder's cumulative timings, the prefix cache's use."""
        c = self.cache
        return {"active": self.active, "waiting": self.waiting, "timings": dict(self.timings),
                "cache": {"entries": len(c), "bytes": c.nbytes, "hits": c.hits, "tokens_saved": c.tokens_saved}}  # fmt: skip

    @property
    def active(self) -> int:
        return len(self.decoder)

    @property
    def waiting(self) -> int:
        return self._waiting_rows

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job | list[Job] | list[list[Job]]) -> None:
        """Queue one job, one group (a prompt's choices: prefilled once), or several groups, all or none
        (``QueueFull`` when the waiting rows would pass ``max_queue``)."""
        groups = [[job]] if isinstance(job, Job) else [job] if isinstance(job[0], Job) else job
        rows = sum(len(g) for g in groups)  # type: ignore[arg-type]
        if any(len(g) > self.max_batch for g in groups):  # type: ignore[arg-type]
            raise ValueError(f"a group of more than max_batch={self.max_batch} rows can never be admitted")
        with self._cv:
            if self._waiting_rows + rows > self.max_queue:
                raise QueueFull
            self._waiting.extend(groups)  # type: ignore[arg-type]
            self._waiting_rows += rows
            self._cv.notify()

    def _admit(self) -> list[list[Job]]:
        with self._cv:
            if not self._waiting and not len(self.decoder) and not self._stop:
                trim_malloc()  # idle: give the freed activations of the last burst back
                while not self._waiting and not len(self.decoder) and not self._stop:
                    self._cv.wait()
                self._gather()
            new, rows = [], len(self.decoder)
            while self._waiting and rows + len(self._waiting[0]) <= self.max_batch:
                group = self._waiting.popleft()
                new.append(group)
                rows += len(group)
                self._waiting_rows -= len(group)
            return new

    def _gather(self) -> None:
        """Woken from idle by a request: keep admitting while more arrive less than ``burst_s`` apart
        (8 gaps at most), so that a burst of short prompts is prefilled together and starts decoding in
        the same step (``BatchDecoder``: together). Holds ``_cv``; a lone request waits one gap."""
        deadline = time.monotonic() + 8 * self.burst_s
        seen = len(self._waiting)
        while self.burst_s > 0 and not self._stop and self._waiting_rows < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(timeout=min(self.burst_s, left))
            if len(self._waiting) == seen:
                return  # nothing new within a gap
            seen = len(self._waiting)

    def _run(self) -> None:
        with torch.no_grad():
            while not self._stop:
                self._admit_and_start()
                if len(self.decoder):
                    self._step()
                self._flush()  # before _admit waits for work
        with self._cv:
            for job in [j for g in self._waiting for j in g] + list(self._jobs.values()):
                job.fail("server shutting down")
        self._flush()

    def _flush(self) -> None:
        """Hand the events of this step to their event loops, one ``call_soon_threadsafe`` per loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, str, Any]]] = {}
        for event in self._outbox:
            by_loop.setdefault(event[0].loop, []).append(event)
        self._outbox.clear()
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the event loop is gone (server shutting down)
                for job, _, _ in events:
                    job.row.cancelled = True

    def _admit_and_start(self) -> None:
        for group in self._admit():  # (a loop variable in _run would keep the last job alive while idle)
            self._start(group)

    def _step(self) -> None:
        """One decoder step; the finished rows' jobs are told (in a method of its own, so that no
        local variable keeps the last requests alive while the engine waits)."""
        self.max_rows_seen = max(self.max_rows_seen, len(self.decoder.rows))
        try:
            finished = self.decoder.step()
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
            finished = self._fail_all(e)
        self.steps += 1
        for row in finished:
            job = self._jobs.pop(row, None)
            if job is not None:
                job.finish()

    def _start(self, group: list[Job]) -> None:
        for job in group:
            job.outbox = self._outbox
        live = [j for j in group if not j.row.cancelled]
        for job in group:
            if job.row.cancelled:
                job.row.finish_reason = "cancelled"
                job.finish()
        if not live:
            return
        try:  # checks the rows; their prompt is fed by the next steps
            self.decoder.add(live[0].row, [j.row for j in live[1:]])
        except Exception as e:  # noqa: BLE001 - a request the model rejects fails alone
            for job in live:
                job.fail(f"{type(e).__name__}: {e}")
            return
        for job in live:
            if job.row.done:
                job.finish()
            else:
                self._jobs[job.row] = job

    def _fail_all(self, e: Exception) -> list[Row]:
        for row, job in self._jobs.items():
            row.finish_reason = "error"
            job.fail(f"{type(e).__name__}: {e}")
        self._jobs.clear()
        self.decoder = self._decoder(self.decoder.cache)
        return []
