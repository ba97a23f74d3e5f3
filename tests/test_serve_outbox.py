"""The engine hands a step's events to the event loop at once: every row's text and end arrive, in
order, with at most one wake-up of the loop per engine step (not one per token)."""

from __future__ import annotations

import asyncio

import pytest
import torch

import rwkvkit
from rwkvkit.decoder import Row
from rwkvkit.generation import TextStream
from rwkvkit.sampling import GREEDY, Sampler
from rwkvkit.serve.engine import Engine, Job

V = 65536


@pytest.fixture
def model(world_model: torch.nn.Module) -> torch.nn.Module:
    return world_model


def test_one_wake_up_per_step_and_every_event_in_order(model: torch.nn.Module) -> None:
    tok = rwkvkit.Tokenizer()
    n_rows, n_tokens = 4, 12

    async def main() -> tuple[list[list[tuple]], list[Row], int, int]:
        loop = asyncio.get_running_loop()
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            nonlocal calls
            calls += 1
            return real(*args, **kw)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        engine = Engine(model, max_batch=n_rows)
        engine.start()
        try:
            queue: asyncio.Queue = asyncio.Queue()
            rows = [
                Row(prompt=tok.encode(f"Row {i} says"), sampler=Sampler(GREEDY, V), max_tokens=n_tokens)
                for i in range(n_rows)
            ]
            jobs = [Job(r, TextStream(tok, []), loop, i, queue) for i, r in enumerate(rows)]
            engine.submit([[j] for j in jobs])
            events: list[list[tuple]] = [[] for _ in range(n_rows)]
            done = 0
            while done < n_rows:
                index, kind, value = await asyncio.wait_for(queue.get(), 60)
                events[index].append((kind, value))
                done += kind != "text"
            return events, rows, calls, engine.steps
        finally:
            engine.close()

    events, rows, calls, steps = asyncio.run(main())
    for ev, row in zip(events, rows):
        assert ev[-1] == ("done", ("length", n_tokens))
        texts = [v for k, v in ev[:-1]]
        assert all(k == "text" for k, _ in ev[:-1])
        counts = [n for _, n in texts]
        assert counts == sorted(counts) and counts[-1] <= n_tokens
        assert "".join(piece for piece, _ in texts) == tok.decode(row.tokens)
    n_events = sum(len(ev) for ev in events)
    assert calls <= steps < n_events  # batched: fewer wake-ups than events
