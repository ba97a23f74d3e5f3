"""The FastAPI application: routes, request parsing, and relaying the engine's text to the client.

Handlers read the body (``security.read_body``: size and time limits), validate it
(``protocol.request_models``), turn it into a ``Row`` (tokens, sampler, budget, stop strings), submit
it to the ``Engine`` and relay its pieces, as one JSON response or as server-sent events
(``data: {...}`` chunks, then ``data: [DONE]``). A client that goes away, streaming or not, cancels
its row: the non-streaming handler watches the connection while it waits.

Every failure is an OpenAI-shaped JSON error with a 4xx status (``errors.APIError``): malformed or
deeply nested JSON, wrong types, values out of range, oversize or slow bodies, prompts too long or
not encodable, a full queue (429), a missing key (401), a wrong Host, Origin or Content-Type
(``security.Guard``). An unexpected failure is still JSON (500). ``/docs`` and ``/openapi.json`` are
off: the API is OpenAI's.

(No ``from __future__ import annotations`` in this module: FastAPI reads the handlers' annotations at
run time, and ``Request`` is imported inside ``create_app``.)
"""

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any

import torch

from ..generate import Row, TextStream, penalty_weights
from ..sampling import Sampler, SamplingParams
from .engine import Engine, Job, QueueFull
from .errors import APIError
from .protocol import MAX_STOP, MAX_STOP_CHARS, Responder, chat_prompt, message_text, request_models
from .security import LOOPBACK_HOSTS, Guard, check_api_key, check_key, read_body

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0


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
               max_queue: int = 64, default_max_tokens: int = 256, prefill_slice: int = 32,
               allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS, cors_origins: Iterable[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES, body_timeout: float = BODY_TIMEOUT_S) -> Any:  # fmt: skip
    """The ASGI application (``Guard`` around FastAPI); its engine starts and stops with it.

    ``allowed_hosts``: the Host names answered (None: any; see ``security.allowed_hosts_for``).
    ``cors_origins``: browser origins allowed to call the API (none by default). ``prefill_slice``:
    prompt tokens fed per decode step while other requests stream.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    check_api_key(api_key)
    CompletionRequest, ChatRequest = request_models()
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prefill_slice=prefill_slice)
    vocab = int(model.config.vocab_size)
    weights = penalty_weights(tokenizer, vocab)

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

    def make_job(req: Any, ids: list[int], stops: list[str]) -> Job:
        if len(ids) == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(ids) > max_prompt_tokens:
            raise APIError(
                400, f"prompt has {len(ids)} tokens, the limit is {max_prompt_tokens}", param="prompt"
            )
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
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
        try:
            params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                    penalty_decay=req.penalty_decay, seed=req.seed)  # fmt: skip
            sampler = Sampler(params, vocab, weights)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        row = Row(prompt=ids, sampler=sampler, max_tokens=n, stop_tokens=frozenset({0}))
        job = Job(row, TextStream(tokenizer, stops + user_stop), asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(
                429, "the server's queue is full; retry later", type_="server_overloaded"
            ) from None
        return job

    async def events(job: Job) -> AsyncIterator[tuple[str, Any]]:
        try:
            while True:
                kind, value = await job.queue.get()
                if kind == "error":
                    raise APIError(500, value, type_="server_error")
                yield kind, value
                if kind == "done":
                    return
        finally:
            job.cancel()  # a no-op when it finished; else the client left: the engine drops the row

    async def watch_disconnect(request: Request, job_ref: "weakref.ref[Job]") -> None:
        """Cancel the job when the client closes the connection (the body is already read). It holds
        the job weakly: a cancelled task's traceback would otherwise keep the row alive for the GC."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job = job_ref()
                if job is not None:
                    job.cancel()
                    job.push("done", "cancelled")  # wakes the handler
                return

    async def run(request: Request, job: Job, r: Responder, include_usage: bool, stream: bool) -> Any:
        def usage() -> dict:
            return r.usage(len(job.row.prompt), len(job.row.tokens))

        if not stream:
            watcher = asyncio.create_task(watch_disconnect(request, weakref.ref(job)))
            pieces, finish = [], None
            try:
                async for k, v in events(job):
                    if k == "text":
                        pieces.append(v)
                    else:
                        finish = v
            finally:
                watcher.cancel()
            body = r.envelope([r.choice("".join(pieces), finish, False)], False)
            body["usage"] = usage()
            return JSONResponse(body)

        async def sse() -> AsyncIterator[str]:
            first = r.first_chunk()
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            try:
                async for k, v in events(job):
                    c = r.choice(v, None, True) if k == "text" else r.choice("", v, True)
                    yield f"data: {json.dumps(r.envelope([c], True))}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                job.cancel()  # the client disconnected mid-stream (a no-op when finished)
            if include_usage:
                last = r.envelope([], True)
                last["usage"] = usage()
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "active": engine.active, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request.headers, api_key)
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "rwkvkit"}],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await parse(request, CompletionRequest)
        ids = encode(req.prompt, "prompt") if isinstance(req.prompt, str) else list(req.prompt)
        job = make_job(req, ids, [])
        inc = bool((req.stream_options or {}).get("include_usage"))
        return await run(request, job, Responder("completion", req.model or model_name), inc, req.stream)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = await parse(request, ChatRequest)
        prompt = chat_prompt([(m.role, message_text(m.content)) for m in req.messages])
        job = make_job(req, encode(prompt, "messages"), ["\n\n"])
        inc = bool((req.stream_options or {}).get("include_usage"))
        return await run(request, job, Responder("chat", req.model or model_name), inc, req.stream)

    guarded = Guard(app, allowed_hosts=allowed_hosts, cors_origins=cors_origins, max_body=max_body_bytes)
    guarded.state = app.state  # type: ignore[attr-defined] - tests and benchmarks reach the engine here
    return guarded
