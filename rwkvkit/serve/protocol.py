"""The OpenAI API as this server speaks it: request schemas, the chat prompt format, response objects.

Requests are validated by strict pydantic models (``request_models``; pydantic comes with FastAPI and
is imported lazily): unknown fields are ignored, wrong types and out-of-range values are a 400 that
names the field. Sampling defaults are OpenAI's (temperature 1, top_p 1, no penalties); RWKV's
``top_k`` and ``penalty_decay`` are accepted as extensions. Limits that depend on the server
(``n``, ``logprobs``, prompts per request) are checked by the app, which knows them.

The chat prompt is RWKV World's ``User: ...\n\nAssistant: ...\n\n`` format. ``chat_segments``
cuts it into the pieces the server tokenizes one by one: ``"Role:"`` and ``" content\n\n"`` per
message, then ``"Assistant:"``. A reply the model generates after ``"Assistant:"`` (ending in the
``\n\n`` that stops it) is then tokenized in the next turn's prompt as the model's own tokens were,
whatever tokens the vocabulary has across those boundaries, so the next turn's prompt starts with this
turn's prompt + reply tokens, and the server's state after the reply serves it. (With the World
vocabulary no token crosses these boundaries, so the segments tokenize as the whole string does.)

``Responder`` builds the response objects of one request (``text_completion`` /
``chat.completion`` and their stream chunks): ``choice`` is where per-choice fields go,
``envelope`` wraps choices, ``usage`` counts tokens.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from .errors import APIError

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator can be seeded with (after mod 2**64)
MAX_LOGIT_BIAS = 300  # entries of logit_bias


def request_models() -> tuple[type, type]:
    """(CompletionRequest, ChatRequest) pydantic models."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Common(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")

        @model_validator(mode="before")
        @classmethod
        def _null_is_default(cls, data: Any) -> Any:
            """OpenAI's API lets a client send ``null`` for any optional field (some clients send every
            field): null then means the field's default, as if it were left out."""
            if isinstance(data, dict):
                fields = cls.model_fields
                return {
                    k: v
                    for k, v in data.items()
                    if v is not None or k not in fields or fields[k].is_required()
                }
            return data

        model: str | None = None
        max_tokens: int | None = Field(default=None, ge=0)
        max_completion_tokens: int | None = Field(default=None, ge=0)
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, ge=0.0, le=1.0)
        top_k: int = Field(default=0, ge=0)
        presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
        frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
        penalty_decay: float = Field(default=0.996, ge=0.0, le=1.0)
        seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: dict[str, bool] | None = None
        n: int = Field(default=1, ge=1)
        logit_bias: dict[str, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)

    class CompletionRequest(Common):
        prompt: str | list[int] | list[str] | list[list[int]]
        echo: bool = False
        logprobs: int | None = Field(default=None, ge=0)
        best_of: int | None = Field(default=None, ge=1)
        suffix: str | None = None

    class Part(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        type: str  # only "text" is served: chat_refusal names any other
        text: str | None = None

    class Message(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[Part] | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        logprobs: bool = False
        top_logprobs: int | None = Field(default=None, ge=0)
        # OpenAI fields this server does not implement, read only to refuse them (``chat_refusal``)
        tools: Any = None
        tool_choice: Any = None
        functions: Any = None
        function_call: Any = None
        response_format: Any = None
        modalities: Any = None
        audio: Any = None

    return CompletionRequest, ChatRequest


def parse_logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    """A request's ``logit_bias`` as {token id: bias}; APIError (400) for a key that is not a token id
    in [0, vocab) in plain decimal ("5", not " 5", "05" or another script's digits: no two keys name one
    token) or a bias outside [-100, 100]."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and str(int(key)) == key) or int(key) >= vocab:
            raise APIError(400, f"logit_bias keys must be token ids in [0, {vocab}) in plain decimal, got {key!r}",
                           param="logit_bias")  # fmt: skip
        if not -100.0 <= value <= 100.0:
            raise APIError(
                400, f"logit_bias values must be in [-100, 100], got {value!r}", param="logit_bias"
            )
        out[int(key)] = float(value)
    return out


def chat_refusal(req: Any) -> tuple[str, str] | None:
    """(param, message) for a chat request asking for what this server does not do (function calling,
    a JSON response format, audio), else None: refused with a 400 rather than silently ignored."""
    for param in ("tools", "functions"):
        if getattr(req, param):
            return param, f"{param} are not supported (this server does not call functions)"
    for param in ("tool_choice", "function_call"):
        if getattr(req, param) not in (None, "none"):
            return param, f"{param} is not supported (this server does not call functions)"
    for i, m in enumerate(req.messages):
        for part in m.content if isinstance(m.content, list) else []:
            if part.type != "text":
                return (
                    f"messages[{i}].content",
                    f"content parts of type {part.type!r} are not supported (text only)",
                )
            if part.text is None:
                return f"messages[{i}].content", "a text content part needs its 'text'"
    fmt = req.response_format
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    if fmt is not None and kind != "text":
        return "response_format", (f"response_format {kind!r} is not supported (this server does not "
                                   "constrain its output); leave it out or use {'type': 'text'}")  # fmt: skip
    if req.modalities not in (None, ["text"]) or req.audio is not None:
        return ("audio" if req.audio is not None else "modalities"), "only text output is supported"
    return None


_ROLE = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def chat_segments(messages: list[tuple[str, str]]) -> list[str]:
    """The chat prompt in the pieces that are tokenized separately (module docstring)."""
    parts = []
    for role, content in messages:
        text = re.sub(r"\n\s*\n", "\n", content.strip())  # '\n\n' separates turns; keep it out of turns
        parts += [f"{_ROLE[role]}:", f" {text}\n\n"]
    return [*parts, "Assistant:"]


def chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The RWKV World chat format: ``User: ...\\n\\nAssistant: ...\\n\\n`` ... ending in ``Assistant:``."""
    return "".join(chat_segments(messages))


def message_text(content: object) -> str:
    """A chat message's content (a string, a list of text parts, or None) as one string."""
    if isinstance(content, str):
        return content
    return "".join(p.text for p in (content or []))  # type: ignore[attr-defined]


class Responder:
    """The response objects of one request: ``kind`` is "completion" or "chat"."""

    def __init__(self, kind: str, model_id: str) -> None:
        self.kind, self.model_id = kind, model_id
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def choice(
        self, text: str, finish: str | None, delta: bool, index: int = 0, logprobs: dict | None = None
    ) -> dict:
        if self.kind == "chat":
            msg: dict = {"content": text} if delta else {"role": "assistant", "content": text}
            return {
                "index": index,
                "delta" if delta else "message": msg,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def first_chunk(self, n_choices: int = 1) -> dict | None:
        """Chat streams open with the assistant role and empty content, for every choice."""
        if self.kind != "chat":
            return None
        deltas = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                  for i in range(n_choices)]  # fmt: skip
        return self.envelope(deltas, chunk=True)

    def envelope(self, choices: list, chunk: bool) -> dict:
        obj = self.object + ".chunk" if (chunk and self.kind == "chat") else self.object
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_id,
            "choices": choices,
        }

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        """OpenAI's usage object; ``cached_tokens``: prompt tokens whose state came from the cache."""
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        }
