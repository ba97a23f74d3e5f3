"""An OpenAI-compatible HTTP server: ``rwkvkit serve --model PATH``.

Design:

- One background thread (``Engine``) owns the model. It prefills each new request (reusing cached
  prompt prefixes), then decodes every active request together with one ``[B, 1]`` forward per step
  (``rwkvkit.generate.BatchDecoder``): a single weight read per step serves all rows, which is what
  makes many concurrent clients cheap on an RNN. Rows leave when finished or when their client goes.
- The HTTP side is FastAPI on uvicorn (``pip install rwkvkit[serve]``, imported lazily). Handlers
  validate the body with strict pydantic models, enqueue a job and relay its text pieces, either as
  one JSON response or as server-sent events (``data: {...}`` chunks, then ``data: [DONE]``).
- Every failure is an OpenAI-shaped JSON error (``{"error": {"message", "type", "param", "code"}}``)
  with a 4xx status: malformed JSON, wrong types, oversize body / prompt / max_tokens, full queue,
  missing or wrong API key (``Authorization: Bearer``). The server binds to 127.0.0.1 by default.

Sampling defaults are OpenAI's (temperature 1, top_p 1, no penalties); RWKV's ``top_k`` and
``penalty_decay`` are accepted as extensions.
"""

import argparse
import asyncio
import hmac
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, Literal

import torch

from .generate import BatchDecoder, PrefixCache, Row, TextStream, penalty_weights
from .sampling import Sampler, SamplingParams

MAX_BODY_BYTES = 1 << 20


def _require_serve_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(
            f"rwkvkit serve needs FastAPI and uvicorn: pip install 'rwkvkit[serve]' ({e})"
        ) from e


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- the decode engine ---------------------------------------------------------------------------
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

    def _on_token(self, token: int) -> bool:
        piece = self.text.feed(token)
        if piece:
            self.push("text", piece)
        return self.text.stopped

    def finish(self) -> None:
        if self.row.finish_reason != "cancelled":
            tail = self.text.finish()
            if tail:
                self.push("text", tail)
        self.push("done", self.row.finish_reason)


class QueueFull(Exception):
    pass


class Engine:
    """The background decode loop: admits waiting jobs up to ``max_batch`` and steps them together."""

    def __init__(self, model: torch.nn.Module, *, max_batch: int = 16, max_queue: int = 64,
                 chunk_len: int = 256, cache_entries: int = 16) -> None:  # fmt: skip
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.decoder = BatchDecoder(model, chunk_len=chunk_len, cache=PrefixCache(cache_entries))
        self._waiting: deque[Job] = deque()
        self._jobs: dict[Row, Job] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="rwkvkit-engine", daemon=True)
        self.steps = 0
        self.max_rows_seen = 0

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
            while not self._waiting and not len(self.decoder) and not self._stop:
                self._cv.wait()
            new = []
            while self._waiting and len(self.decoder) + len(new) < self.max_batch:
                new.append(self._waiting.popleft())
            return new

    def _run(self) -> None:
        with torch.no_grad():
            while not self._stop:
                for job in self._admit():
                    self._start(job)
                if len(self.decoder):
                    self.max_rows_seen = max(self.max_rows_seen, len(self.decoder))
                    try:
                        finished = self.decoder.step()
                    except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
                        finished = self._fail_all(e)
                    self.steps += 1
                    for row in finished:
                        self._jobs.pop(row).finish()
        with self._cv:
            for job in list(self._waiting) + list(self._jobs.values()):
                job.push("error", "server shutting down")

    def _start(self, job: Job) -> None:
        if job.row.cancelled:
            job.row.finish_reason = "cancelled"
            job.finish()
            return
        try:
            self.decoder.add(job.row)
        except Exception as e:  # noqa: BLE001 - a request the model rejects fails alone
            job.push("error", f"{type(e).__name__}: {e}")
            return
        if job.row.done:
            job.finish()
        else:
            self._jobs[job.row] = job

    def _fail_all(self, e: Exception) -> list[Row]:
        for row, job in self._jobs.items():
            row.finish_reason = "error"
            job.push("error", f"{type(e).__name__}: {e}")
        self._jobs.clear()
        self.decoder = BatchDecoder(self.model, chunk_len=self.decoder.chunk_len, cache=self.decoder.cache)
        return []


# ---- HTTP ------------------------------------------------------------------------------------------
def _request_models() -> tuple[type, type]:
    from pydantic import BaseModel, ConfigDict, Field

    class Common(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        model: str | None = None
        max_tokens: int | None = Field(default=None, ge=0)
        max_completion_tokens: int | None = Field(default=None, ge=0)
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, ge=0.0, le=1.0)
        top_k: int = Field(default=0, ge=0)
        presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
        frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
        penalty_decay: float = Field(default=0.996, ge=0.0, le=1.0)
        seed: int | None = None
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: dict[str, bool] | None = None
        n: int = Field(default=1, ge=1, le=1)

    class CompletionRequest(Common):
        prompt: str | list[int]

    class Part(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[Part] | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)

    return CompletionRequest, ChatRequest


_ROLE = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The RWKV World chat format: ``User: ...\\n\\nAssistant: ...\\n\\n`` ... ending in ``Assistant:``."""
    parts = []
    for role, content in messages:
        text = re.sub(r"\n\s*\n", "\n", content.strip())  # '\n\n' separates turns; keep it out of turns
        parts.append(f"{_ROLE[role]}: {text}\n\n")
    return "".join(parts) + "Assistant:"


def create_app(model: torch.nn.Module, tokenizer: Any, *, model_name: str = "rwkv", api_key: str | None = None,
               max_batch: int = 16, max_tokens_limit: int = 4096, max_prompt_tokens: int = 8192,
               max_queue: int = 64, default_max_tokens: int = 256) -> Any:  # fmt: skip
    """The FastAPI application (its engine starts with the app and stops with it)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    CompletionRequest, ChatRequest = _request_models()
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue)
    vocab = int(model.config.vocab_size)
    weights = penalty_weights(tokenizer, vocab)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="rwkvkit", lifespan=lifespan)
    app.state.engine = engine

    def err(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(_r: Request, e: APIError) -> JSONResponse:
        return err(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_r: Request, e: HTTPException) -> JSONResponse:
        return err(APIError(e.status_code, str(e.detail), code=str(e.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_r: Request, e: RequestValidationError) -> JSONResponse:
        return err(APIError(400, str(e.errors()[:3])))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")  # fmt: skip

    async def parse(request: Request, schema: type) -> Any:
        check_key(request)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"request body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
        try:
            json.loads(body)
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
        if len(user_stop) > 16 or any(len(s) > 256 for s in user_stop):
            raise APIError(400, "at most 16 stop strings of up to 256 characters", param="stop")
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                penalty_decay=req.penalty_decay, seed=req.seed)  # fmt: skip
        row = Row(
            prompt=ids, sampler=Sampler(params, vocab, weights), max_tokens=n, stop_tokens=frozenset({0})
        )
        job = Job(row, TextStream(tokenizer, stops + user_stop), asyncio.get_running_loop())
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(
                429, "the server's queue is full; retry later", type_="server_overloaded"
            ) from None
        return job

    async def run(job: Job, kind: str, model_id: str, include_usage: bool, stream: bool) -> Any:
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def usage() -> dict:
            p, c = len(job.row.prompt), len(job.row.tokens)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if kind == "chat":
                key = "delta" if delta else "message"
                msg: dict = {"content": text} if delta else {"role": "assistant", "content": text}
                return {"index": 0, key: msg, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        def envelope(choices: list, chunk: bool) -> dict:
            o = obj + ".chunk" if (chunk and kind == "chat") else obj
            return {"id": rid, "object": o, "created": created, "model": model_id, "choices": choices}

        async def events() -> AsyncIterator[tuple[str, Any]]:
            try:
                while True:
                    kind_, value = await job.queue.get()
                    if kind_ == "error":
                        raise APIError(500, value, type_="server_error")
                    yield kind_, value
                    if kind_ == "done":
                        return
            finally:
                if not job.row.done:
                    job.row.cancelled = True  # the client left: the engine drops the row next step

        if not stream:
            pieces, finish = [], None
            async for k, v in events():
                if k == "text":
                    pieces.append(v)
                else:
                    finish = v
            body = envelope([choice("".join(pieces), finish, False)], False)
            body["usage"] = usage()
            return JSONResponse(body)

        async def sse() -> AsyncIterator[str]:
            if kind == "chat":
                first = envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": None, "finish_reason": None}], True)  # fmt: skip
                yield f"data: {json.dumps(first)}\n\n"
            try:
                async for k, v in events():
                    c = choice(v, None, True) if k == "text" else choice("", v, True)
                    yield f"data: {json.dumps(envelope([c], True))}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                if not job.row.done:
                    job.row.cancelled = True  # the client disconnected mid-stream
            if include_usage:
                last = envelope([], True)
                last["usage"] = usage()
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "active": len(engine.decoder), "waiting": len(engine._waiting)}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "rwkvkit"}],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = await parse(request, CompletionRequest)
        ids = tokenizer.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        job = make_job(req, ids, [])
        inc = bool((req.stream_options or {}).get("include_usage"))
        return await run(job, "completion", req.model or model_name, inc, req.stream)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        req = await parse(request, ChatRequest)
        msgs = []
        for m in req.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            msgs.append((m.role, content))
        job = make_job(req, tokenizer.encode(chat_prompt(msgs)), ["\n\n"])
        inc = bool((req.stream_options or {}).get("include_usage"))
        return await run(job, "chat", req.model or model_name, inc, req.stream)

    return app


def main(argv: list[str] | None = None) -> int:
    """``rwkvkit serve --model PATH``: serve a model over an OpenAI-compatible HTTP API."""
    p = argparse.ArgumentParser(prog="rwkvkit serve", description=main.__doc__)
    p.add_argument(
        "--model", required=True, help="local .pth/.safetensors, hf://owner/repo/file.pth or owner/repo:file"
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--model-name", default=None, help="the id /v1/models reports (default: the file name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together per step")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="longest prompt accepted, in tokens")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    for name in ("max_batch", "max_tokens_limit", "max_prompt_tokens", "max_queue"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    _require_serve_deps()
    import uvicorn

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from .checkpoint import load
    from .hub import ModelNotFound, resolve_model
    from .tokenizer import Tokenizer

    try:
        path = resolve_model(args.model)
    except ModelNotFound as e:
        print(f"rwkvkit serve: {e}")
        return 2
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = load(path, device=args.device, dtype=dtype)
    app = create_app(model, Tokenizer(), model_name=args.model_name or path.stem, api_key=args.api_key,
                     max_batch=args.max_batch, max_tokens_limit=args.max_tokens_limit,
                     max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
