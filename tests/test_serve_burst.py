"""An idle engine woken by a request keeps admitting for as long as more follow within ``burst_ms``, so
that a burst's short prompts are prefilled together in one forward (``BatchDecoder``: together);
``burst_ms=0`` starts on the first request at once, as before."""

from __future__ import annotations

import asyncio
import threading
import time

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


def _burst(model: torch.nn.Module, burst_ms: float, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Three 4-token requests submitted 5 ms apart to an idle engine; the shapes the model was called with."""
    shapes: list[tuple[int, ...]] = []
    inner = model.forward
    monkeypatch.setattr(
        model, "forward", lambda x, state=None, **kw: shapes.append(tuple(x.shape)) or inner(x, state, **kw)
    )
    tok = rwkvkit.Tokenizer()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        engine = Engine(model, max_batch=4, burst_ms=burst_ms)
        engine.start()
        try:
            queue: asyncio.Queue = asyncio.Queue()
            rows = [Row(prompt=[100 + 10 * i + j for j in range(4)], sampler=Sampler(GREEDY, V), max_tokens=3)
                    for i in range(3)]  # fmt: skip
            jobs = [Job(r, TextStream(tok, []), loop, i, queue) for i, r in enumerate(rows)]

            def arrive() -> None:
                for j in jobs:
                    engine.submit(j)
                    time.sleep(0.005)

            threading.Thread(target=arrive).start()
            done = 0
            while done < len(jobs):
                _, kind, _ = await asyncio.wait_for(queue.get(), 60)
                done += kind != "text"
        finally:
            engine.close()

    asyncio.run(main())
    monkeypatch.undo()
    return shapes


def test_a_burst_is_admitted_together_and_prefilled_in_one_forward(model, monkeypatch) -> None:
    shapes = _burst(model, 200.0, monkeypatch)
    assert shapes[0] == (3, 4)  # the three prompts, in one forward
    assert all(s[1] == 1 for s in shapes[1:])  # then decode steps only


def test_burst_ms_zero_starts_on_the_first_request(model) -> None:
    """An idle engine woken by a request admits it alone with ``burst_ms=0``, and waits for the next
    one (arriving 0.2 s later) with a gap of 1 s."""
    tok = rwkvkit.Tokenizer()
    loop = asyncio.new_event_loop()
    try:
        for burst, want in ((0.0, 1), (1000.0, 2)):
            engine = Engine(model, max_batch=4, burst_ms=burst)  # not started: _admit is called here
            jobs = [Job(Row(prompt=[1, 2, 3], sampler=Sampler(GREEDY, V), max_tokens=1), TextStream(tok, []), loop)
                    for _ in range(2)]  # fmt: skip
            got: list = []
            waiter = threading.Thread(target=lambda e=engine, out=got: out.append(e._admit()))
            waiter.start()
            time.sleep(0.2)  # the engine is idle, waiting for work
            engine.submit(jobs[0])
            time.sleep(0.2)
            engine.submit(jobs[1])
            waiter.join(10)
            assert len(got[0]) == want, burst
    finally:
        loop.close()
    with pytest.raises(ValueError, match="burst_ms"):
        Engine(model, burst_ms=-1)
