"""What stands between the network (or a web page in the user's browser) and the model.

- ``Guard``, a plain ASGI middleware in front of the app, refuses before any handler runs:
  a ``Host`` header that is not one of the allowed names (DNS rebinding: a page on ``evil.example``
  resolving to 127.0.0.1 sends ``Host: evil.example``), an ``Origin`` that is not an explicitly
  allowed CORS origin (none by default: browsers always send ``Origin`` on cross-origin requests), a
  POST whose ``Content-Type`` is not ``application/json`` (the "simple" text/plain cross-origin POST
  a page can send without a preflight), and a declared ``Content-Length`` above the body limit.
  Allowed origins get CORS headers and preflight answers.
- ``read_body`` reads a request body with a size limit (counted while streaming, before anything is
  buffered beyond it) and a deadline (a client that sends half a body is answered 408).
- ``check_key`` compares ``Authorization: Bearer <key>`` in constant time.
- ``guarded_protocol`` is uvicorn's h11 protocol with a deadline for each request's headers: a
  connection that sends nothing, or half a header, is closed after ``header_timeout`` seconds
  (uvicorn's own keep-alive timeout only runs between complete requests).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterable
from typing import Any

from .errors import APIError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def allowed_hosts_for(bind: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to ``bind`` answers: loopback names for a loopback bind, the
    address itself (plus loopback) for a specific one, anything (None) for 0.0.0.0 / :: unless
    ``extra`` names hosts."""
    extra = {h.lower().strip("[]") for h in extra}
    b = bind.lower().strip("[]")
    if b in ("0.0.0.0", "::", ""):
        return frozenset(extra | LOOPBACK_HOSTS) if extra else None
    return frozenset({b} | LOOPBACK_HOSTS | extra)


def _hostname(host: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware: Host, Origin / CORS, Content-Type and declared body size, checked first."""

    def __init__(self, app: Any, *, allowed_hosts: Iterable[str] | None, cors_origins: Iterable[str] = (),
                 max_body: int) -> None:  # fmt: skip
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)
        self.cors_origins = frozenset(o.rstrip("/") for o in cors_origins)
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.lower(), v)
        origin = headers.get(b"origin")
        cors: dict[str, str] = {}
        if origin is not None:
            o = origin.decode("latin-1")
            if o.rstrip("/") not in self.cors_origins and "*" not in self.cors_origins:
                await self._refuse(scope, receive, send, APIError(
                    403, f"cross-origin requests from {o!r} are not allowed (start the server with "
                    "--cors-origin ORIGIN to allow one)", code="origin_not_allowed"))  # fmt: skip
                return
            cors = {"Access-Control-Allow-Origin": o, "Vary": "Origin"}
        try:
            self._check(scope, headers)
        except APIError as e:
            await self._refuse(scope, receive, send, e, cors)
            return
        if (
            origin is not None
            and scope["method"] == "OPTIONS"
            and b"access-control-request-method" in headers
        ):
            await self._preflight(send, cors)
            return
        if not cors:
            await self.app(scope, receive, send)
            return

        async def send_cors(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k.encode(), v.encode()) for k, v in cors.items())]}  # fmt: skip
            await send(message)

        await self.app(scope, receive, send_cors)

    def _check(self, scope: dict, headers: dict[bytes, bytes]) -> None:
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            if _hostname(host) not in self.allowed_hosts:
                raise APIError(400, f"Host {host!r} is not served here (allowed: {sorted(self.allowed_hosts)}; "
                               "start the server with --allowed-host NAME to add one)", code="host_not_allowed")  # fmt: skip
        if scope["method"] != "POST":
            return
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            raise APIError(415, f"Content-Type must be application/json, got {ctype.decode('latin-1')!r}",
                           code="unsupported_media_type", close=True)  # fmt: skip
        length = headers.get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise APIError(400, "invalid Content-Length header", close=True)
            if int(length) > self.max_body:
                raise APIError(413, f"request body of {int(length)} bytes exceeds the limit of {self.max_body}",
                               code="request_too_large", close=True)  # fmt: skip

    async def _refuse(
        self, scope: dict, receive: Any, send: Any, e: APIError, headers: dict | None = None
    ) -> None:
        await e.response(headers)(scope, receive, send)

    async def _preflight(self, send: Any, cors: dict[str, str]) -> None:
        headers = {**cors, "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                   "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600"}  # fmt: skip
        await send({"type": "http.response.start", "status": 204,
                    "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})


async def read_body(request: Any, limit: int, timeout: float) -> bytes:
    """The whole body, refusing (413) as soon as it passes ``limit`` bytes and (408) when it has not
    all arrived ``timeout`` seconds after the headers. Reads the ASGI messages directly (no
    exception ends the loop, so no frame -> exception -> frame cycles are left for the collector)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        remaining = deadline - loop.time()
        try:
            message = await asyncio.wait_for(request.receive(), remaining) if remaining > 0 else None
        except asyncio.TimeoutError:
            message = None
        if message is None:
            raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                           close=True)  # fmt: skip
        if message["type"] == "http.disconnect":
            raise APIError(400, "the client disconnected while sending the body", close=True)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large",
                           close=True)  # fmt: skip
        chunks.append(chunk)
        more = bool(message.get("more_body", False))
    return b"".join(chunks)


def check_api_key(key: str | None) -> None:
    """ValueError unless ``key`` can be sent in an HTTP header: printable ASCII, no spaces."""
    if key is not None and (not key or not key.isascii() or not key.isprintable() or " " in key):
        raise ValueError("the API key must be printable ASCII without spaces (HTTP headers carry ASCII)")


def check_key(headers: Any, api_key: str | None) -> None:
    """401 unless ``Authorization: Bearer <api_key>`` (constant-time comparison of the raw bytes)."""
    if api_key is None:
        return
    scheme, _, token = headers.get("authorization", "").partition(" ")
    sent = token.strip().encode("latin-1", "replace")  # Starlette decodes header bytes as latin-1
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent, api_key.encode("ascii")):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                       type_="authentication_error", code="invalid_api_key")  # fmt: skip


def guarded_protocol(header_timeout: float) -> type:
    """uvicorn's ``H11Protocol`` closing connections whose next request's headers take longer than
    ``header_timeout`` seconds to arrive (idle or half-sent)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._seen_cycle: Any = None
            self._header_timer: Any = None
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._on_header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _request_started(self) -> None:
            if self.cycle is not None and self.cycle is not self._seen_cycle:
                self._seen_cycle = self.cycle
                self._disarm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._request_started()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers get the same deadline
            self._request_started()  # a pipelined request may already have started

        def _on_header_timeout(self) -> None:
            self._header_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
