"""Log-probabilities in OpenAI's two shapes, built from a decoder ``Row``'s recorded scores.

- Completions (the legacy shape): ``{"tokens": [str], "token_logprobs": [float | None],
  "top_logprobs": [{str: float} | None], "text_offset": [int]}``. Each ``top_logprobs`` entry holds
  the ``logprobs`` most probable tokens plus the chosen token when it is not among them (OpenAI's
  rule: "up to logprobs+1 elements"). ``text_offset`` is each token's character offset in the
  choice's ``text`` (which starts with the prompt under ``echo``). Echoed prompt tokens come first;
  the first has no context, so its logprob and top entry are null.
- Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}], "refusal": None}``, ``top_logprobs`` holding exactly the ``top_logprobs`` most
  probable tokens.

Token strings: a token whose bytes are whole UTF-8 is its text; a token that is not (part of a
character: the World vocabulary has 486 such byte tokens) is written ``bytes:\\xNN...`` (OpenAI's
convention in the legacy shape), and its real bytes are in the chat shape's ``bytes`` list. The
end-of-text token (id 0, no bytes) is ``<|endoftext|>`` with ``bytes`` null. An id the model has but
the vocabulary lacks (a 65536-logit model's 65530..65535 with the World vocabulary's 65529 entries)
is what the text shows for it: U+FFFD, with that character's bytes.

Streams send each chunk the entries of the tokens generated since the previous chunk, so that text
held back (half a character, the start of a possible stop string) carries its tokens with it when
it is released; the last chunk carries whatever remains. Every generated token is listed, including
the one that completed a stop string (its text is cut from ``text``).
"""

from __future__ import annotations

import codecs
from typing import Any

from ..decoder import Row

EOT = "<|endoftext|>"
REPLACEMENT = "\ufffd".encode()  # what the text shows for an id outside the vocabulary


class TokenStrings:
    """Token id -> (string, bytes or None), cached, for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, bytes | None]] = {}

    def get(self, token: int) -> tuple[str, bytes | None]:
        hit = self._cache.get(token)
        if hit is None:
            fn = getattr(self._tok, "token_bytes", None)
            try:
                b = fn(token) if callable(fn) else self._tok.decode_bytes([token])
            except ValueError:  # an id the model has and the vocabulary lacks: the text shows U+FFFD
                b = REPLACEMENT
            if not b:
                hit = (EOT, None)
            else:
                try:
                    hit = (b.decode("utf-8"), b)
                except UnicodeDecodeError:
                    hit = ("bytes:" + "".join(f"\\x{x:02x}" for x in b), b)
            self._cache[token] = hit
        return hit

    def text(self, token: int) -> str:
        return self.get(token)[0]


def _continues(held: bytes, byte: int) -> bool:
    """Whether ``byte`` can follow ``held`` (the start of a UTF-8 character) in valid UTF-8."""
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(held + bytes([byte]))
    except UnicodeDecodeError:
        return False
    return True


class ChoiceLogprobs:
    """The log-probabilities of one choice, handed out in order: the echoed prompt first (``prompt``),
    then the generated tokens up to a count (``take``). ``kind`` is "completion" or "chat"."""

    def __init__(self, row: Row, strings: TokenStrings, kind: str) -> None:
        self.row, self.strings, self.kind = row, strings, kind
        self.sent = 0  # generated tokens handed out so far
        self.offset = 0  # characters of the choice's text before the next token
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def _advance(self, token: int) -> int:
        """The offset of ``token``'s first character in the text, then move past its characters. Bytes
        held from earlier tokens (half a character) that ``token`` does not continue become U+FFFD in
        the text before it: they count before its offset, not in it."""
        b = self.strings.get(token)[1]
        if not b:
            return self.offset
        held = self._utf8.getstate()[0]
        if held and not _continues(held, b[0]):
            self.offset += len(held.decode("utf-8", "replace"))
            self._utf8.reset()
        at = self.offset
        self.offset += len(self._utf8.decode(b))
        return at

    def prompt(self) -> dict:
        """The echoed prompt's entries (legacy shape; chat has no echo)."""
        r = self.row
        lps = r.prompt_logprobs or [None] * len(r.prompt)
        tops = r.prompt_top_logprobs or [None] * len(r.prompt)
        out = self._legacy(r.prompt, lps, tops)
        self.offset += len(self._utf8.decode(b"", final=True))  # the echo's text is decoded on its own
        self._utf8.reset()
        return out

    def take(self, upto: int) -> dict:
        """Entries of generated tokens ``sent .. upto - 1``, in this choice's shape."""
        r, lo = self.row, self.sent
        self.sent = max(lo, upto)
        toks, lps, tops = r.tokens[lo:upto], r.token_logprobs[lo:upto], r.top_logprobs[lo:upto]
        if self.kind == "chat":
            return {
                "content": [self._chat(t, lp, top) for t, lp, top in zip(toks, lps, tops)],
                "refusal": None,
            }
        return self._legacy(toks, lps, tops)

    def _legacy(self, toks: list[int], lps: list, tops: list) -> dict:
        text = self.strings.text
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in zip(toks, lps, tops):
            out["tokens"].append(text(t))
            out["token_logprobs"].append(lp)
            out["text_offset"].append(self._advance(t))
            if lp is None or top is None:
                out["top_logprobs"].append(None)
                continue
            d = {text(i): v for i, v in top}
            d.setdefault(text(t), lp)
            out["top_logprobs"].append(d)
        return out

    def _entry(self, token: int, lp: float) -> dict:
        s, b = self.strings.get(token)
        return {"token": s, "logprob": lp, "bytes": list(b) if b is not None else None}

    def _chat(self, token: int, lp: float, top: list) -> dict:
        e = self._entry(token, lp)
        e["top_logprobs"] = [self._entry(i, v) for i, v in top]
        return e


def merge(parts: list[dict]) -> dict:
    """Concatenate legacy logprobs objects (echo's prompt part, then the generated part)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in parts:
        for k in out:
            out[k] += p[k]
    return out
