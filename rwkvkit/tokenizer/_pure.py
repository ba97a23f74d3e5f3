"""Pure-Python twin of the native tokenizer core (``_trie.c``): same methods, same results.

It is the oracle the tests compare the native core against, and the fallback when the C
extension is not built. Greedy longest match: one dict maps every prefix of every token to its id
(0 when the prefix is not itself a token); at each position the match grows one byte at a time
while the prefix is known, and the last prefix that is a token wins. Ids 1..256 cover all single
bytes, so every input encodes.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd".encode()


def _source(obj: Any) -> bytes:
    if isinstance(obj, str):
        return obj.encode("utf-8")  # UnicodeEncodeError for lone surrogates, as the native core
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    raise TypeError(f"encode() takes str or bytes, not {type(obj).__name__}")


class PyCore:
    """``PyCore(tokens)``: ``tokens[i]`` is the bytes of id ``i``, ``tokens[0] == b""``."""

    def __init__(self, tokens: Sequence[bytes]) -> None:
        if not 257 <= len(tokens) <= 65536:
            raise ValueError(f"Core(tokens): need 257..65536 entries, got {len(tokens)}")
        if tokens[0] != b"":
            raise ValueError("Core(tokens): id 0 (end-of-document) must be empty")
        self._tokens = list(tokens)
        nodes: dict[bytes, int] = {}
        for idx, tok in enumerate(self._tokens):
            if not tok:
                continue
            if nodes.get(tok):
                raise ValueError(f"Core(tokens): ids {nodes[tok]} and {idx} have the same bytes")
            for k in range(1, len(tok)):
                nodes.setdefault(tok[:k], 0)
            nodes[tok] = idx
        missing = [c for c in range(256) if not nodes.get(bytes([c]))]
        if missing:
            raise ValueError(f"Core(tokens): the single byte 0x{missing[0]:02x} is not a token")
        self._nodes = nodes
        self._single = [nodes[bytes([c])] for c in range(256)]

    def encode(self, obj: Any) -> list[int]:
        src = _source(obj)
        nodes, single, tokens = self._nodes, self._single, self._tokens
        out: list[int] = []
        i, n = 0, len(src)
        while i < n:
            best = single[src[i]]
            j = i + 2
            while j <= n:
                v = nodes.get(src[i:j])
                if v is None:
                    break
                if v:
                    best = v
                j += 1
            out.append(best)
            i += len(tokens[best])
        return out

    def encode_raw(self, obj: Any, itemsize: int) -> bytearray:
        fmt = {2: "H", 4: "I", 8: "Q"}.get(itemsize)
        if fmt is None:
            raise ValueError(f"encode_raw: itemsize must be 2, 4 or 8, not {itemsize}")
        ids = self.encode(obj)
        return bytearray(struct.pack(f"={len(ids)}{fmt}", *ids))

    def _ids(self, ids: Any) -> list[int]:
        if isinstance(ids, (list, tuple)):
            out = []
            for i, x in enumerate(ids):
                try:
                    out.append(operator.index(x))
                except TypeError:
                    raise TypeError(f"token ids must be ints; item {i} is {type(x).__name__}") from None
            return out
        try:
            view = memoryview(ids)
        except TypeError:
            raise TypeError(
                f"token ids must be a list, tuple or 1-D integer array, not {type(ids).__name__}"
            ) from None
        if view.format.lstrip("<=@") not in tuple("bBhHiIlLqQ"):
            raise TypeError(f"token id arrays must hold integers, not format '{view.format}'")
        return list(view.cast("B").cast(view.format.lstrip("<=@")))

    def decode_bytes(self, ids: Any, errors: str = "strict") -> bytes:
        if errors not in ("strict", "replace"):
            raise ValueError(f"errors must be 'strict' or 'replace', not '{errors}'")
        tokens, n = self._tokens, len(self._tokens)
        parts = []
        for pos, i in enumerate(self._ids(ids)):
            if 0 < i < n and tokens[i]:
                parts.append(tokens[i])
            elif i == 0:
                continue
            elif errors == "strict":
                raise ValueError(f"token id {i} at position {pos} is outside the vocabulary (0..{n - 1})")
            else:
                parts.append(_REPLACEMENT)
        return b"".join(parts)

    def decode(self, ids: Any, errors: str = "replace") -> str:
        return self.decode_bytes(ids, errors).decode("utf-8", errors)

    def stats(self) -> dict[str, int]:
        return {"nodes": len(self._nodes) + 1, "cells": 0, "table_bytes": 0, "n_ids": len(self._tokens)}
