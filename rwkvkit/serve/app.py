"""The FastAPI application: routes, request parsing, and relaying the engine's text to the client.

Handlers read the body (``security.read_body``: size and time limits), validate it
(``protocol.request_models``), turn it into rows (``decoder.Row``: tokens, sampler, budget, stop
strings, logprobs, echo), submit them to the ``Engine`` and relay their pieces, as one JSON
response or as server-sent events (``data: {...}`` chunks, then ``data: [DONE]``). A client that
goes away, streaming or not, cancels its rows: the non-streaming handler watches the connection.

A request has one row per choice: ``prompt`` may be a string, a list of token ids, a list of strings
or a list of token-id lists, and each prompt gets ``n`` choices, indexed ``prompt_i * n + j``
(OpenAI's order); a prompt's choices are prefilled once. Choice ``j`` samples with ``seed + j`` when a
seed is given. Log-probabilities (``logprobs``, ``echo``, chat ``logprobs``/``top_logprobs``) are
recorded by the decoder and shaped by ``logprobs.ChoiceLogprobs``. Chat replies of single-choice
requests leave their end state in the prefix cache (``Row.cache_end``).

Every failure is an OpenAI-shaped JSON error with a 4xx status (``errors.APIError``): malformed or
deeply nested JSON, wrong types, values out of range, oversize or slow bodies, prompts too long or
not encodable, what this server does not do (``best_of`` other than ``n``, ``suffix``), limits
(``n``, ``logprobs``, prompts per request), a full queue (429), a missing key (401), a wrong Host,
Origin or Content-Type (``security.Guard``). An unexpected failure is still JSON (500). ``/docs``
and ``/openapi.json`` are off: the API is OpenAI's.

(No ``from __future__ import annotations`` in this module: FastAPI reads the handlers' annotations at
run time, and ``Request`` is imported inside ``create_app``.)
"""

import asyncio
import json
import traceback
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any

import torch

from ..decoder import Row
from ..generation import TextStream, penalty_weights
from ..sampling import SEED_RANGE, Sampler, SamplingParams
from .engine import BURST_MS, CACHE_BYTES, CACHE_ENTRIES, RIDE_TOKENS, Engine, Job, QueueFull
from .errors import APIError
from .logprobs import ChoiceLogprobs, TokenStrings, merge
from .protocol import (
    MAX_STOP,
    MAX_STOP_CHARS,
    Responder,
    chat_refusal,
    chat_segments,
    message_text,
    parse_logit_bias,
    request_models,
)
from .security import LOOPBACK_HOSTS, Guard, check_api_key, check_key, read_body

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI: 5 for completions, 20 for chat)


def _require_serve_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"rwkvkit serve needs FastAPI and uvicorn: pip install 'rwkvkit[serve]' ({e})"
        ) from e


def create_app(model: torch.nn.Module, tokenizer: Any, *, model_name: str = "rwkv", api_key: str | None = None,
               max_batch: int = 16, max_tokens_limit: int = 4096, max_prompt_tokens: int = 8192,
               max_queue: int = 64, default_max_tokens: int = 256, prefill_slice: int = 32, ride_tokens: int = RIDE_TOKENS,
               allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS, cors_origins: Iterable[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S,
               max_logprobs: int = MAX_LOGPROBS, cache_entries: int = CACHE_ENTRIES,
               cache_bytes: int | None = CACHE_BYTES, burst_ms: float = BURST_MS) -> Any:  # fmt: skip
    """The ASGI application (``Guard`` around FastAPI); its engine starts and stops with it.

    ``allowed_hosts``: the Host names answered (None: any; see ``security.allowed_hosts_for``).
    ``cors_origins``: browser origins allowed to call the API (none by default). ``prefill_slice``:
    prompt tokens fed per decode step while other requests stream; ``ride_tokens``: prompts with at most
    this many tokens left feed them through the decode step instead (``rwkvkit.decoder``); ``burst_ms``:
    how long an idle engine keeps admitting a burst (``Engine``). ``max_batch`` also bounds ``n``,
    ``max_queue`` the rows (prompts x n) of one request, ``max_logprobs`` the alternatives per token.
    ``cache_entries`` / ``cache_bytes``: the bounds of the prefix cache of states.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    check_api_key(api_key)
    CompletionRequest, ChatRequest = request_models()
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefill_slice=prefill_slice,
                    ride_tokens=ride_tokens, cache_entries=cache_entries, cache_bytes=cache_bytes,
                    burst_ms=burst_ms)  # fmt: skip
    vocab = int(model.config.vocab_size)
    weights = penalty_weights(tokenizer, vocab)
    strings = TokenStrings(tokenizer)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="rwkvkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_r: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_r: Request, e: HTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), code=str(e.status_code)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_r: Request, e: RequestValidationError) -> JSONResponse:
        return APIError(400, str(e.errors()[:3])).response()

    @app.exception_handler(Exception)
    async def _unexpected(_r: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}", type_="server_error").response()

    async def parse(request: Request, schema: type) -> Any:
        check_key(request.headers, api_key)
        body = await read_body(request, max_body_bytes, body_timeout)
        try:
            json.loads(body)
        except RecursionError:
            raise APIError(400, "request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        try:
            return schema.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ()))
            raise APIError(
                400, f"invalid request: {param}: {first.get('msg')}", param=param or None
            ) from None

    def encode(text: str, param: str) -> list[int]:
        try:
            return list(tokenizer.encode(text))
        except (ValueError, TypeError) as e:  # lone surrogates and the like
            raise APIError(400, f"{param} cannot be tokenized: {e}", param=param) from None

    def check_prompt(ids: list[int]) -> list[int]:
        if len(ids) == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > max_prompt_tokens:
            raise APIError(
                400, f"prompt has {len(ids)} tokens, the limit is {max_prompt_tokens}", param="prompt"
            )
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids

    def prompts_of(prompt: Any) -> list[tuple[list[int], str]]:
        """(token ids, text) of each prompt: a string, token ids, strings, or token-id lists."""
        if isinstance(prompt, str):
            return [(encode(prompt, "prompt"), prompt)]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [(list(prompt), tokenizer.decode(list(prompt)))]
        if isinstance(prompt[0], str):
            return [(encode(p, "prompt"), p) for p in prompt]
        return [(list(p), tokenizer.decode(list(p))) for p in prompt]

    def submit(req: Any, prompts: list[tuple[list[int], str]], stops: list[str], logprobs: int | None,
               echo: bool, cache_end: bool) -> list[Job]:  # fmt: skip
        """One row per choice (``n`` per prompt, prefilled once per prompt), queued all together."""
        if req.n > max_batch:
            raise APIError(400, f"n {req.n} exceeds this server's limit {max_batch} (--max-batch)", param="n")
        if len(prompts) * req.n > max_queue:
            raise APIError(400, f"{len(prompts)} prompts x n={req.n} choices exceed this server's limit of "
                           f"{max_queue} rows per request (--max-queue)", param="prompt")  # fmt: skip
        if logprobs is not None and logprobs > max_logprobs:
            raise APIError(400, f"at most {max_logprobs} log-probabilities per token on this server, got {logprobs}",
                           param="logprobs")  # fmt: skip
        for ids, _ in prompts:
            check_prompt(ids)
        n = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        n = default_max_tokens if n is None else n
        if n > max_tokens_limit:
            raise APIError(
                400, f"max_tokens {n} exceeds this server's limit {max_tokens_limit}", param="max_tokens"
            )
        user_stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(user_stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in user_stop):
            raise APIError(
                400, f"at most {MAX_STOP} stop strings of up to {MAX_STOP_CHARS} characters", param="stop"
            )
        bias = parse_logit_bias(req.logit_bias, vocab)
        try:
            params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                    penalty_decay=req.penalty_decay, seed=req.seed)  # fmt: skip
            per_choice = [params if params.seed is None or j == 0 else
                          params.with_(seed=(params.seed + j) % SEED_RANGE) for j in range(req.n)]  # fmt: skip
            Sampler(params, vocab, weights)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        groups = []
        for i, (ids, _) in enumerate(prompts):
            group = []
            for j in range(req.n):
                row = Row(prompt=ids, sampler=Sampler(per_choice[j], vocab, weights), max_tokens=n,
                          stop_tokens=frozenset({0}), logprobs=logprobs, echo=echo and logprobs is not None,
                          logit_bias=bias, cache_end=cache_end and req.n == 1)  # fmt: skip
                group.append(Job(row, TextStream(tokenizer, stops + user_stop), loop, i * req.n + j, queue))
            groups.append(group)
        try:
            engine.submit(groups)
        except QueueFull:
            raise APIError(
                429, "the server's queue is full; retry later", type_="server_overloaded"
            ) from None
        return [j for g in groups for j in g]

    async def events(jobs: list[Job]) -> AsyncIterator[tuple[int, str, Any]]:
        """The jobs' events until every one is done (or the client disconnects)."""
        left = len(jobs)
        try:
            while left:
                index, kind, value = await jobs[0].queue.get()
                if kind == "error":
                    raise APIError(500, value, type_="server_error")
                if kind == "disconnect":
                    return
                yield index, kind, value
                left -= kind == "done"
        finally:
            for job in jobs:
                job.cancel()  # a no-op when finished; else the client left: the engine drops the row

    async def watch_disconnect(request: Request, job_refs: "list[weakref.ref[Job]]") -> None:
        """Cancel the jobs when the client closes the connection (the body is already read). It holds
        them weakly: a cancelled task's traceback would otherwise keep the rows alive for the GC."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                jobs = [j for j in (ref() for ref in job_refs) if j is not None]
                for job in jobs:
                    job.cancel()
                if jobs:
                    jobs[0].queue.put_nowait((-1, "disconnect", None))  # wakes the handler
                return

    class Choice:
        """What the handler builds up for one choice."""

        def __init__(self, job: Job, kind: str, echo_text: str | None, logprobs: bool) -> None:
            self.job, self.echo_text, self.pieces, self.finish = job, echo_text, [], None
            self.lp = ChoiceLogprobs(job.row, strings, kind) if logprobs else None
            self.opened = False

        def opening(self) -> tuple[str, dict | None] | None:
            """Echo: the prompt's text and log-probabilities, once, before the choice's first text."""
            if self.opened or self.echo_text is None:
                return None
            self.opened = True
            return self.echo_text, self.lp.prompt() if self.lp is not None else None

        def take(self, upto: int) -> dict | None:
            if self.lp is None:
                return None
            part = self.lp.take(upto)
            return part if (part.get("content") or part.get("tokens")) else None

    async def run(request: Request, jobs: list[Job], r: Responder, prompts: list[tuple[list[int], str]],
                  include_usage: bool, stream: bool, echo: bool, logprobs: bool) -> Any:  # fmt: skip
        n_prompt = sum(len(ids) for ids, _ in prompts)
        n_choices = len(jobs) // len(prompts)
        choices = {j.index: Choice(j, r.kind, prompts[j.index // n_choices][1] if echo else None, logprobs)
                   for j in jobs}  # fmt: skip

        def usage() -> dict:
            done = sum(len(j.row.tokens) for j in jobs)
            return r.usage(n_prompt, done, sum(j.row.cached_tokens for j in jobs[::n_choices]))

        if not stream:
            watcher = asyncio.create_task(watch_disconnect(request, [weakref.ref(j) for j in jobs]))
            try:
                async for index, kind, value in events(jobs):
                    c = choices[index]
                    if kind == "text":
                        c.pieces.append(value[0])
                    else:
                        c.finish = value[0]
            finally:
                watcher.cancel()
            out = []
            for index in sorted(choices):
                c = choices[index]
                head = c.opening()
                text = (head[0] if head else "") + "".join(c.pieces)
                lp = None
                if c.lp is not None:
                    tail = c.lp.take(len(c.job.row.tokens))
                    lp = merge([head[1], tail]) if head and head[1] is not None else tail
                out.append(r.choice(text, c.finish, False, index, lp))
            body = r.envelope(out, False)
            body["usage"] = usage()
            return JSONResponse(body)

        async def sse() -> AsyncIterator[str]:
            first = r.first_chunk(len(jobs))
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            try:
                async for index, kind, value in events(jobs):
                    c = choices[index]
                    head = c.opening()
                    if head is not None:
                        yield f"data: {json.dumps(r.envelope([r.choice(head[0], None, True, index, head[1])], True))}\n\n"
                    text, finish = (value[0], None) if kind == "text" else ("", value[0])
                    chunk = r.choice(text, finish, True, index, c.take(value[1]))
                    yield f"data: {json.dumps(r.envelope([chunk], True))}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            except Exception as e:  # noqa: BLE001 - the 200 is sent: the error goes in the stream (and the log)
                traceback.print_exc()
                err = APIError(500, f"internal error: {type(e).__name__}", type_="server_error")
                yield f"data: {json.dumps(err.body())}\n\n"
            finally:
                for job in jobs:
                    job.cancel()  # the client disconnected mid-stream (a no-op when finished)
            if include_usage:
                last = r.envelope([], True)
                last["usage"] = usage()
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health(request: Request) -> dict:
        """Liveness for anyone; the engine's rows, timings and cache counters only with the API key
        (when the server has one): they tell an outsider how busy the server is and what it caches."""
        try:
            check_key(request.headers, api_key)
        except APIError:
            return {"status": "ok"}
        return {"status": "ok", **engine.stats()}

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "rwkvkit"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request.headers, api_key)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(request: Request, model_id: str) -> dict:
        check_key(request.headers, api_key)
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist (this server has {model_name!r})",
                           param="model", code="model_not_found")  # fmt: skip
        return card

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await parse(request, CompletionRequest)
        if req.suffix:
            raise APIError(
                400, "suffix is not supported (this server does not fill in the middle)", param="suffix"
            )
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (this server does not rank completions); leave it out "
                           "or set it equal to n", param="best_of")  # fmt: skip
        prompts = prompts_of(req.prompt)
        jobs = submit(req, prompts, [], req.logprobs, req.echo, cache_end=False)
        inc = bool((req.stream_options or {}).get("include_usage"))
        r = Responder("completion", req.model or model_name)
        return await run(request, jobs, r, prompts, inc, req.stream, req.echo, req.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = await parse(request, ChatRequest)
        refused = chat_refusal(req)
        if refused:
            raise APIError(400, refused[1], param=refused[0])
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        segments = chat_segments([(m.role, message_text(m.content)) for m in req.messages])
        ids = [t for seg in segments for t in encode(seg, "messages")]
        prompts = [(ids, "".join(segments))]
        k = (req.top_logprobs or 0) if req.logprobs else None
        jobs = submit(req, prompts, ["\n\n"], k, False, cache_end=True)
        inc = bool((req.stream_options or {}).get("include_usage"))
        r = Responder("chat", req.model or model_name)
        return await run(request, jobs, r, prompts, inc, req.stream, False, req.logprobs)

    guarded = Guard(app, allowed_hosts=allowed_hosts, cors_origins=cors_origins, max_body=max_body_bytes)
    guarded.state = app.state  # type: ignore[attr-defined] - tests and benchmarks reach the engine here
    return guarded
