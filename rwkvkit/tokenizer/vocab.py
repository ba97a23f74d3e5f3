"""Reading RWKV vocabulary files (the World tokenizer's ``rwkv_vocab_v20230424.txt`` format).

One token per line: ``<id> <python str or bytes literal> <byte length>``, LF or CRLF line endings.
A str literal stands for its UTF-8 bytes. Literals are parsed with ``ast.literal_eval`` (never
``eval``); literals without a backslash are taken verbatim between their quotes, which is what
``literal_eval`` would return for them, only faster. Every problem is reported as a
:class:`VocabError` naming the file and line.

The result is a list indexed by id: ``tokens[i]`` is the bytes of id ``i``; ``tokens[0]`` is ``b""``
(id 0 is end-of-document and is not in the file), and ids missing from the file are ``b""`` too.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

DEFAULT_VOCAB = Path(__file__).with_name("rwkv_vocab_v20230424.txt")
MAX_ID = 65535  # ids are stored as uint16
MAX_TOKEN_BYTES = 255


class VocabError(ValueError):
    """A vocabulary file that does not follow the ``<id> <literal> <length>`` format."""


def _literal(text: str) -> str | bytes:
    """The value of one str/bytes literal; a fast path for literals without escapes."""
    if "\\" not in text and len(text) >= 2:
        q = text[-1]
        if q in "'\"":
            if text[0] == q and q not in text[1:-1]:
                return text[1:-1]
            if text[0] in "bB" and text[1] == q and q not in text[2:-1] and text[2:-1].isascii():
                return text[2:-1].encode("ascii")
    value = ast.literal_eval(text)
    if not isinstance(value, (str, bytes)):
        raise ValueError(f"expected a str or bytes literal, got {type(value).__name__}")
    return value


def parse_vocab(data: bytes, source: str = "<vocab>") -> list[bytes]:
    """Parse the text of a vocabulary file; see the module docstring for the format."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise VocabError(f"{source}:{line}: the file is not valid UTF-8 ({e.reason})") from None
    by_id: dict[int, bytes] = {}
    seen: dict[bytes, int] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        first, last = line.find(" "), line.rfind(" ")
        if first <= 0 or last <= first:
            raise VocabError(f"{where}: expected '<id> <literal> <length>', got {line[:80]!r}")
        try:
            idx, length = int(line[:first]), int(line[last + 1 :])
        except ValueError:
            raise VocabError(f"{where}: id and length must be integers, got {line[:80]!r}") from None
        try:
            value = _literal(line[first + 1 : last])
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise VocabError(f"{where}: bad token literal {line[first + 1 : last][:80]!r}: {e}") from None
        try:
            token = value.encode("utf-8") if isinstance(value, str) else value
        except UnicodeEncodeError:
            raise VocabError(f"{where}: the literal contains a lone surrogate") from None
        if len(token) != length:
            raise VocabError(f"{where}: token {token!r} has {len(token)} bytes but the line says {length}")
        if not 1 <= idx <= MAX_ID:
            raise VocabError(f"{where}: id {idx} is outside 1..{MAX_ID} (0 is end-of-document)")
        if not 1 <= length <= MAX_TOKEN_BYTES:
            raise VocabError(f"{where}: tokens must have 1..{MAX_TOKEN_BYTES} bytes, this has {length}")
        if idx in by_id:
            raise VocabError(f"{where}: id {idx} appears twice")
        if token in seen:
            raise VocabError(f"{where}: token {token!r} already has id {seen[token]}")
        by_id[idx] = token
        seen[token] = idx
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        shown = ", ".join(f"0x{b:02x}" for b in missing[:8])
        raise VocabError(f"{source}: every single byte must be a token so all input encodes; missing {shown}")
    tokens = [b""] * (max(by_id) + 1)
    for idx, token in by_id.items():
        tokens[idx] = token
    return tokens


def load_vocab(path: str | os.PathLike[str] | None = None) -> list[bytes]:
    """Read a vocabulary file (default: the World vocabulary shipped with rwkvkit)."""
    p = DEFAULT_VOCAB if path is None else Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read vocabulary file {str(p)!r}: {e.strerror or e}") from e
    return parse_vocab(data, str(p))
