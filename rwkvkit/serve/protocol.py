"""The OpenAI API as this server speaks it: request schemas, the chat prompt format, response objects.

Requests are validated by strict pydantic models (``request_models``; pydantic comes with FastAPI and
is imported lazily): unknown fields are ignored, wrong types and out-of-range values are a 400 that
names the field. Sampling defaults are OpenAI's (temperature 1, top_p 1, no penalties); RWKV's
``top_k`` and ``penalty_decay`` are accepted as extensions.

``Responder`` builds the response objects of one request (``text_completion`` /
``chat.completion`` and their stream chunks): ``choice`` is where per-choice fields go (``logprobs``
is null today), ``envelope`` wraps choices, ``usage`` counts tokens.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Literal

MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator can be seeded with (after mod 2**64)


def request_models() -> tuple[type, type]:
    """(CompletionRequest, ChatRequest) pydantic models."""
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
        seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
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

    def choice(self, text: str, finish: str | None, delta: bool, index: int = 0) -> dict:
        if self.kind == "chat":
            msg: dict = {"content": text} if delta else {"role": "assistant", "content": text}
            return {
                "index": index,
                "delta" if delta else "message": msg,
                "logprobs": None,
                "finish_reason": finish,
            }
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}

    def first_chunk(self) -> dict | None:
        """Chat streams open with the assistant role and empty content."""
        if self.kind != "chat":
            return None
        delta = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return self.envelope([delta], chunk=True)

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
    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
