"""The RWKV World tokenizer: the public :class:`Tokenizer` over a native or pure-Python core.

Encoding is greedy longest match over the UTF-8 bytes (the reference ``TRIE_TOKENIZER`` of the
``rwkv`` package, id for id). The core is chosen by argument, never by environment:
``backend="native"`` (the C double-array trie in ``_trie.c``), ``"python"`` (its twin in
``_pure.py``) or ``"auto"`` (native when built, else python).

Decoding, and how it relates to the reference (whose ``decode`` is
``try: bytes.decode('utf-8') except: return '\\ufffd'``):

- ``errors="replace"`` (default): ids outside the vocabulary become U+FFFD and invalid UTF-8 is
  replaced per bad sequence, as ``bytes.decode(errors="replace")`` does. Same text as the reference
  whenever the reference succeeds.
- ``errors="strict"``: ``ValueError`` for an id outside the vocabulary, ``UnicodeDecodeError`` for
  bytes that are not UTF-8.
- ``errors="reference"``: exactly the reference: the whole result is a single ``'\\ufffd'`` if
  anything fails, including an id 0 (the reference has no entry for it).

Id 0 is end-of-document; it decodes to nothing in ``replace``/``strict`` mode.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rwkvkit.tokenizer._pure import PyCore
from rwkvkit.tokenizer.vocab import load_vocab

TextLike = str | bytes | bytearray | memoryview
_ARRAY_DTYPES = {np.dtype(t) for t in (np.uint16, np.int32, np.uint32, np.int64, np.uint64)}
_BUILD_HINT = (
    "the native tokenizer core (rwkvkit.tokenizer._native) is not built; build it with "
    "`pip install --no-deps --no-build-isolation -e .` (needs a C compiler), or pass backend='python'"
)


def native_available() -> bool:
    """Whether the C core was built and imports."""
    try:
        from rwkvkit.tokenizer import _native  # noqa: F401
    except ImportError:
        return False
    return True


def _check_text(obj: Any, where: str = "") -> None:
    if not isinstance(obj, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"encode{where} takes str or bytes, not {type(obj).__name__}")


def _surrogate_error(e: UnicodeEncodeError, where: str = "") -> UnicodeEncodeError:
    ch = e.object[e.start : e.end]
    reason = (
        f"lone surrogate U+{ord(ch[0]):04X}{where} cannot be encoded as UTF-8; the tokenizer needs valid "
        "text (or pass bytes, e.g. text.encode('utf-8', 'surrogatepass'))"
    )
    return UnicodeEncodeError("utf-8", e.object, e.start, e.end, reason)


class StreamDecoder:
    """Incremental decoding for streaming: ``feed(ids)`` returns only complete characters.

    Bytes of a character split across tokens are held back until the rest arrives; ``flush()``
    returns what is left (U+FFFD for an unfinished character in ``replace`` mode).
    """

    def __init__(self, tokenizer: Tokenizer, errors: str = "replace") -> None:
        if errors not in ("replace", "strict"):
            raise ValueError(f"errors must be 'replace' or 'strict', not {errors!r}")
        self._tok = tokenizer
        self._errors = errors
        self._dec = codecs.getincrementaldecoder("utf-8")(errors)

    def feed(self, ids: int | Sequence[int] | np.ndarray) -> str:
        """Decode more ids (one id or a sequence); returns the text that is now complete."""
        if isinstance(ids, (int, np.integer)):
            ids = [int(ids)]
        return self._dec.decode(self._tok.decode_bytes(ids, errors=self._errors))

    def flush(self) -> str:
        """End of stream: the held-back bytes, decoded (an error in ``strict`` mode if incomplete)."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out


class Tokenizer:
    """The RWKV World tokenizer (or another vocabulary file in the same format).

    ``Tokenizer()`` loads the World vocabulary shipped with rwkvkit; ``Tokenizer(path)`` another file.
    ``backend``: ``"auto"`` | ``"native"`` | ``"python"``.
    """

    eod_id: int = 0

    def __init__(self, path: str | os.PathLike[str] | None = None, *, backend: str = "auto") -> None:
        if backend not in ("auto", "native", "python"):
            raise ValueError(f"backend must be 'auto', 'native' or 'python', not {backend!r}")
        if backend != "python" and not native_available():
            if backend == "native":
                raise ImportError(_BUILD_HINT)
            backend = "python"
        if backend == "auto":
            backend = "native"
        tokens = load_vocab(path)
        if backend == "native":
            from rwkvkit.tokenizer._native import Core

            self._core: Any = Core(tokens)
        else:
            self._core = PyCore(tokens)
        self.backend = backend
        self.vocab_size = len(tokens)  # ids 0 .. vocab_size-1 (World: 65530; models pad to 65536)
        del tokens  # the core keeps its own compact copy

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, backend={self.backend!r})"

    # ---------------------------------------------------------------------------------- encode
    def encode(self, text: TextLike) -> list[int]:
        """Token ids of ``text`` (str, encoded as UTF-8, or bytes)."""
        try:
            return self._core.encode(text)
        except UnicodeEncodeError as e:
            raise _surrogate_error(e) from None

    def encode_array(self, text: TextLike, dtype: Any = np.uint16) -> np.ndarray:
        """Token ids as a 1-D numpy array (uint16 default; int32, uint32, int64, uint64 too)."""
        dt = self._array_dtype(dtype)
        try:
            raw = self._core.encode_raw(text, dt.itemsize)
        except UnicodeEncodeError as e:
            raise _surrogate_error(e) from None
        return np.frombuffer(raw, dtype=dt)

    def encode_batch(self, texts: Iterable[TextLike], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts; ``num_threads`` threads (default: all CPUs), each running without the GIL."""
        return self._batch(texts, 0, num_threads)

    def encode_batch_array(
        self, texts: Iterable[TextLike], dtype: Any = np.uint16, num_threads: int | None = None
    ) -> list[np.ndarray]:
        """:meth:`encode_batch` returning numpy arrays."""
        dt = self._array_dtype(dtype)
        return [np.frombuffer(r, dtype=dt) for r in self._batch(texts, dt.itemsize, num_threads)]

    def _array_dtype(self, dtype: Any) -> np.dtype:
        dt = np.dtype(dtype)
        if dt not in _ARRAY_DTYPES:
            raise ValueError(f"dtype must be one of uint16, int32, uint32, int64, uint64, not {dt}")
        return dt.newbyteorder("=")

    def _batch(self, texts: Iterable[TextLike], itemsize: int, num_threads: int | None) -> list[Any]:
        if isinstance(texts, (str, bytes, bytearray, memoryview)):
            raise TypeError("encode_batch takes a list of texts, not a single text")
        items = list(texts)
        for i, t in enumerate(items):
            _check_text(t, f"_batch item {i}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, not {num_threads}")
        n_threads = min(num_threads or os.cpu_count() or 1, len(items))
        core = self._core

        def run(chunk: list[TextLike]) -> list[Any]:
            if self.backend == "native":
                return core.encode_batch(chunk, itemsize)
            return [core.encode(t) if not itemsize else core.encode_raw(t, itemsize) for t in chunk]

        try:
            if n_threads <= 1 or self.backend == "python":
                return run(items)
            # contiguous slices of similar byte counts, one per thread
            sizes = np.cumsum([len(t) for t in items])
            cuts = np.searchsorted(sizes, sizes[-1] * np.arange(1, n_threads) / n_threads)
            bounds = [0, *sorted(set(int(c) + 1 for c in cuts)), len(items)]
            chunks = [items[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
            with ThreadPoolExecutor(max_workers=len(chunks)) as ex:
                return [r for part in ex.map(run, chunks) for r in part]
        except UnicodeEncodeError:
            for i, t in enumerate(items):
                if isinstance(t, str):
                    try:
                        t.encode("utf-8")
                    except UnicodeEncodeError as e:
                        raise _surrogate_error(e, f" (batch item {i})") from None
            raise

    # ---------------------------------------------------------------------------------- decode
    def _ids(self, ids: Any) -> Any:
        if isinstance(ids, (list, tuple)):
            return ids
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise TypeError(f"token id arrays must be 1-D integer arrays, not {ids.ndim}-D {ids.dtype}")
            return np.ascontiguousarray(ids)
        if isinstance(ids, (str, bytes, bytearray, dict, set)) or not isinstance(ids, Iterable):
            raise TypeError(f"token ids must be a list, tuple or 1-D integer array, not {type(ids).__name__}")
        return list(ids)

    def decode_bytes(self, ids: Any, errors: str = "strict") -> bytes:
        """The concatenated bytes of ``ids``; unknown ids raise (``strict``) or give U+FFFD (``replace``)."""
        return self._core.decode_bytes(self._ids(ids), errors)

    def decode(self, ids: Any, errors: str = "replace") -> str:
        """Text of ``ids``; ``errors`` is ``"replace"``, ``"strict"`` or ``"reference"`` (module docstring)."""
        ids = self._ids(ids)
        if errors == "reference":
            try:
                data = self._core.decode_bytes(ids, "strict")
                has_eod = bool((ids == 0).any()) if isinstance(ids, np.ndarray) else 0 in ids
                return "\ufffd" if has_eod else data.decode("utf-8")
            except ValueError:  # an unknown id, or UnicodeDecodeError
                return "\ufffd"
        if errors not in ("replace", "strict"):
            raise ValueError(f"errors must be 'replace', 'strict' or 'reference', not {errors!r}")
        return self._core.decode(ids, errors)

    def stream_decoder(self, errors: str = "replace") -> StreamDecoder:
        """An incremental decoder that never emits half a UTF-8 character."""
        return StreamDecoder(self, errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (``b""`` for id 0)."""
        return self.decode_bytes([token_id])

    def stats(self) -> dict[str, int]:
        """Trie size figures from the core (nodes, cells, table bytes, ids)."""
        return dict(self._core.stats())
