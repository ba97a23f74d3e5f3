"""The server's one error shape: OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Every refusal, from the security layer in front of the app to a request the model cannot run, is an
``APIError`` turned into that JSON with its status code (4xx for anything the client can fix).
``close=True`` adds ``Connection: close``: used when the request body was not read to its end
(oversize, too slow), so the unread rest is never parsed as a next request.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An OpenAI-shaped error response; raise it anywhere in a request's handling."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, *, close: bool = False) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.close = close

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> Any:
        """A Starlette ``JSONResponse`` (also a plain ASGI app)."""
        from starlette.responses import JSONResponse

        h = dict(headers or {})
        if self.close:
            h["Connection"] = "close"
        return JSONResponse(self.body(), status_code=self.status, headers=h)
