"""Token files in RWKV-LM's binidx layout (Megatron ``MMapIndexedDataset``): reader and writers.

A corpus is two files, ``PREFIX.bin`` and ``PREFIX.idx``, readable by RWKV-LM (``src/binidx.py``)
and by :class:`BinIdx`. Every document is stored as one sequence with the end-of-document id 0
appended, as RWKV-LM's ``make_data.py`` writes it.

``PREFIX.bin``: the token ids of all sequences back to back, native little-endian, dtype from the
index (uint16 for the World vocabulary), no header.

``PREFIX.idx`` (all integers little-endian):

=========  ==========================  ==================================================
offset     field                       value
=========  ==========================  ==================================================
0          magic, 9 bytes              ``b"MMIDIDX\\x00\\x00"``
9          version, ``<Q``             1
17         dtype code, ``<B``          1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                       6 float64 (RWKV-LM: Python float), 7 float64, 8 uint16
18         n_sequences, ``<Q``         number of sequences (here: documents)
26         n_doc_idx, ``<Q``           length of doc_idx (here: n_sequences + 1)
34         sizes, int32[n_sequences]   tokens per sequence (including the trailing 0)
...        pointers, int64[n_seq]      byte offset of each sequence in ``.bin``
...        doc_idx, int64[n_doc_idx]   sequence index where each document starts, then the
                                       total: ``[0, 1, ..., n_sequences]``
=========  ==========================  ==================================================

Writers are atomic: both files are written under temporary names next to the target and renamed
into place at the end (the old ``.idx`` is removed first, so an interruption can leave a ``.bin``
without its ``.idx``, never a mismatched pair). The reader checks every size against the files.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
EOD_ID = 0
DTYPE_CODES: dict[int, Any] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float64,
    8: np.uint16,
}
_TOKEN_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3}
_TOKEN_CODES.update({np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.uint16): 8})
_HEADER = struct.Struct("<9sQBQQ")


class BinIdxError(ValueError):
    """A .bin/.idx pair that is missing, truncated or not in the binidx layout."""


def _paths(prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = str(os.fspath(prefix))
    for ext in (".bin", ".idx"):
        if p.endswith(ext):
            p = p[: -len(ext)]
    return Path(p + ".bin"), Path(p + ".idx")


def _token_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _TOKEN_CODES:
        raise ValueError(
            f"binidx token dtype must be one of uint16, int32, int64, uint8, int8, int16, not {dt}"
        )
    return dt


class BinIdxWriter:
    """Streaming writer: ``add(doc)`` appends a document (and its id 0) without holding the corpus.

    Use as a context manager; leaving it normally publishes ``PREFIX.bin``/``PREFIX.idx``, leaving
    it by an exception deletes the temporary files and keeps whatever was there before.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: Any = np.uint16) -> None:
        self.dtype = _token_dtype(dtype)
        self.bin_path, self.idx_path = _paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + tag)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + tag)
        self._file = open(self._bin_tmp, "wb")  # closed by close() or abort()
        self._sizes = array("q")
        self._info = np.iinfo(self.dtype)
        self._eod = np.zeros(1, dtype=self.dtype)
        self.n_tokens = 0

    def add(self, doc: Sequence[int] | np.ndarray) -> None:
        """Append one document's ids; id 0 is appended after them."""
        arr = np.asarray(doc)
        if arr.size == 0:
            arr = arr.reshape(0).astype(self.dtype)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TypeError(f"a document must be a 1-D sequence of integer ids, got {arr.ndim}-D {arr.dtype}")
        if arr.size and arr.dtype != self.dtype:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                bad = lo if lo < self._info.min else hi
                raise ValueError(f"token id {bad} does not fit the binidx dtype {self.dtype}")
            arr = arr.astype(self.dtype)
        self._file.write(np.ascontiguousarray(arr).tobytes())
        self._file.write(self._eod.tobytes())
        self._sizes.append(arr.size + 1)
        self.n_tokens += arr.size + 1

    def __len__(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        """Write the index and move both files into place."""
        if self._file.closed:
            return
        self._file.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int64)
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            self.abort()
            raise ValueError("a document has more than 2**31 - 1 tokens; binidx sizes are int32")
        pointers = np.zeros(sizes.size, dtype=np.int64)
        np.cumsum(sizes[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.arange(sizes.size + 1, dtype=np.int64)
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _TOKEN_CODES[self.dtype], sizes.size, doc_idx.size))
            f.write(sizes.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_idx.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.idx_path.unlink(missing_ok=True)  # never leave an old .idx next to the new .bin
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Drop everything written; the previous files (if any) stay as they were."""
        self._file.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)

    def __enter__(self) -> BinIdxWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_binidx(
    prefix: str | os.PathLike[str], docs: Iterable[Sequence[int] | np.ndarray], dtype: Any = np.uint16
) -> None:
    """Write documents as ``PREFIX.bin``/``PREFIX.idx``, id 0 after each (atomic: temp names, rename)."""
    with BinIdxWriter(prefix, dtype) as w:
        for doc in docs:
            w.add(doc)


class BinIdx:
    """Read-only view of a binidx pair: ``len(obj)`` documents, ``obj[i]`` the ids of document i
    (with its trailing 0), ``.tokens`` all ids in file order (a memmap), ``.dtype``, ``.n_tokens``."""

    def __init__(self, prefix: str | os.PathLike[str]) -> None:
        self.bin_path, self.idx_path = _paths(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise BinIdxError(f"{p} is missing (a binidx corpus is a .bin and a .idx file)")
        idx_size = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise BinIdxError(f"{self.idx_path}: {idx_size} bytes is too short for a binidx header")
        magic, version, code, n_seq, n_doc = _HEADER.unpack(head)
        if magic != MAGIC:
            raise BinIdxError(f"{self.idx_path}: not a binidx index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise BinIdxError(f"{self.idx_path}: index version {version}, only {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise BinIdxError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 4 * n_seq + 8 * n_seq + 8 * n_doc
        if idx_size != expected:
            raise BinIdxError(
                f"{self.idx_path}: {idx_size} bytes, but {n_seq} sequences and {n_doc} doc_idx entries need {expected}"
            )
        off = _HEADER.size
        self.sizes = np.fromfile(self.idx_path, dtype="<i4", count=n_seq, offset=off).astype(np.int64)
        self.pointers = np.fromfile(self.idx_path, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)
        self.doc_idx = np.fromfile(self.idx_path, dtype="<i8", count=n_doc, offset=off + 12 * n_seq)
        self.n_tokens = int(self.sizes.sum())
        bin_size = self.bin_path.stat().st_size
        if bin_size != self.n_tokens * self.dtype.itemsize:
            raise BinIdxError(
                f"{self.bin_path}: {bin_size} bytes, but the index lists {self.n_tokens} tokens of {self.dtype}"
                " (truncated or mismatched pair)"
            )
        starts = (
            np.concatenate([[0], np.cumsum(self.sizes[:-1])]) * self.dtype.itemsize if n_seq else self.sizes
        )
        if not np.array_equal(starts, self.pointers):
            raise BinIdxError(f"{self.idx_path}: pointers are not contiguous byte offsets of the sequences")
        if self.n_tokens:
            self.tokens: np.ndarray = np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return int(self.sizes.size)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"document {i} out of range for {n} documents")
        start = int(self.pointers[j]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[j])]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"BinIdx({str(self.bin_path)[:-4]!r}, docs={len(self)}, tokens={self.n_tokens}, dtype={self.dtype})"
