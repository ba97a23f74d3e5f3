"""The decode engine: one background thread owns the model and serves every request's row.

It admits waiting jobs up to ``max_batch`` rows and steps them with ``rwkvkit.generate.BatchDecoder``
in interleaved mode: each step feeds at most ``prefill_slice`` tokens of a waiting prompt (waiting
prompts take turns), then decodes every active row together with one ``[B, 1]`` forward. A long
prompt therefore delays the running streams by one slice's prefill per token, not by its whole
prefill. Rows leave when finished or when their client goes (``Row.cancelled``, set from the HTTP
side). When the engine runs out of work it hands freed heap memory back to the system
(``rwkvkit.runtime.trim_malloc``), so the resident size levels off under sustained load even with
``tune_malloc``'s high thresholds.

A ``Job`` is the bridge to asyncio: the engine thread pushes ``("text", piece)``, ``("done",
finish_reason)`` or ``("error", message)`` into the job's queue with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any

import torch

from ..generate import BatchDecoder, PrefixCache, Row, TextStream
from ..runtime import trim_malloc


class Job:
    """One request's row plus the channel its text goes back through (an asyncio queue)."""

    def __init__(self, row: Row, text: TextStream, loop: asyncio.AbstractEventLoop) -> None:
        self.row, self.text, self.loop = row, text, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        row.on_token = self._on_token

    def push(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.row.cancelled = True

    def cancel(self) -> None:
        """The client went away: the engine drops the row at its next step."""
        if not self.row.done:
            self.row.cancelled = True

    def _on_token(self, token: int) -> bool:
        piece = self.text.feed(token)
        if piece:
            self.push("text", piece)
        return self.text.stopped

    def finish(self) -> None:
        if self.row.finish_reason == "error":
            self.fail(self.row.error or "generation failed")
            return
        if self.row.finish_reason != "cancelled":
            tail = self.text.finish()
            if tail:
                self.push("text", tail)
        self.push("done", self.row.finish_reason)
        self.release()

    def fail(self, message: str) -> None:
        self.push("error", message)
        self.release()

    def release(self) -> None:
        """Break the row -> hook -> job cycle once the row is over, so that reference counting frees
        the request's tensors (sampler counts, logits) as soon as its handler is done, instead of
        whenever the cyclic garbage collector next runs (the server's memory grew round after round)."""
        self.row.on_token = None


class QueueFull(Exception):
    pass


class Engine:
    """The background decode loop: admits waiting jobs up to ``max_batch`` and steps them together."""

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 16, max_queue: int = 64, chunk_len: int = 256,
                 cache_entries: int = 16, prefill_slice: int = 32) -> None:  # fmt: skip
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.chunk_len, self.prefill_slice = chunk_len, prefill_slice
        self.decoder = self._decoder(PrefixCache(cache_entries))
        self._waiting: deque[Job] = deque()
        self._jobs: dict[Row, Job] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="rwkvkit-engine", daemon=True)
        self.steps = 0
        self.max_rows_seen = 0

    def _decoder(self, cache: PrefixCache | None) -> BatchDecoder:
        return BatchDecoder(self.model, chunk_len=self.chunk_len, cache=cache, interleave=self.prefill_slice)

    @property
    def active(self) -> int:
        return len(self.decoder)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(job)
            self._cv.notify()

    def _admit(self) -> list[Job]:
        with self._cv:
            if not self._waiting and not len(self.decoder) and not self._stop:
                trim_malloc()  # idle: give the freed activations of the last burst back
                while not self._waiting and not len(self.decoder) and not self._stop:
                    self._cv.wait()
            new = []
            while self._waiting and len(self.decoder) + len(new) < self.max_batch:
                new.append(self._waiting.popleft())
            return new

    def _run(self) -> None:
        with torch.no_grad():
            while not self._stop:
                self._admit_and_start()
                if len(self.decoder):
                    self._step()
        with self._cv:
            for job in list(self._waiting) + list(self._jobs.values()):
                job.fail("server shutting down")

    def _admit_and_start(self) -> None:
        for job in self._admit():  # (a loop variable in _run would keep the last job alive while idle)
            self._start(job)

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

    def _start(self, job: Job) -> None:
        if job.row.cancelled:
            job.row.finish_reason = "cancelled"
            job.finish()
            return
        try:
            self.decoder.add(job.row)  # checks the row; its prompt is fed by the next steps
        except Exception as e:  # noqa: BLE001 - a request the model rejects fails alone
            job.fail(f"{type(e).__name__}: {e}")
            return
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
