"""Training data: random crops of a flat token stream across document boundaries, as RWKV-LM does.

A token file is one long stream of ids in which id 0 ends every document (what ``rwkvkit tokenize``
and RWKV-LM's binidx files hold). Supported: a binidx prefix (``prefix.bin`` + ``prefix.idx``, read
with ``rwkvkit.data.binidx.BinIdx``), a ``.npy`` array, or a raw ``.bin`` of uint16 ids.

Sampling follows RWKV-LM's "magic prime" scheme: sample number ``g`` (counted over the whole run and
all processes) starts at ``((a * (g+1)^3) mod p) * ctx_len`` where ``p`` is the largest prime
``p = 2 (mod 3)`` with ``p * ctx_len + 1 <= n_train`` and ``a = int(p * (sqrt(5)-1)/2)``. Cubing is a
bijection modulo such a prime, so every ``p`` consecutive samples visit every ``ctx_len``-aligned
window exactly once, in a scrambled order, and the sample is a pure function of
``(seed, step, rank, index)``: ``--resume`` needs only the step to replay the same data, and any split
of a global batch across processes sees the same samples.

The validation split is the last ``val_fraction`` of the stream (or a separate file), read as
consecutive non-overlapping windows, the same ones at every evaluation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def read_tokens(path: str | Path) -> np.ndarray:
    """The flat token stream of a token file (memory-mapped where possible)."""
    p = Path(path)
    if p.suffix == ".npy" and p.is_file():
        arr = np.load(p, mmap_mode="r")
    elif Path(str(p) + ".idx").is_file() or (
        p.suffix in (".bin", ".idx") and p.with_suffix(".idx").is_file()
    ):
        from rwkvkit.data.binidx import BinIdx

        prefix = str(p.with_suffix("")) if p.suffix in (".bin", ".idx") else str(p)
        arr = BinIdx(prefix).tokens
    elif p.suffix == ".bin" and p.is_file():
        arr = np.memmap(p, dtype=np.uint16, mode="r")
    else:
        raise FileNotFoundError(
            f"token file {str(path)!r} not found: give a binidx prefix (.bin + .idx), a .npy or a raw uint16 .bin"
        )
    if arr.ndim != 1:
        raise ValueError(f"token file {str(path)!r} must hold a flat 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token file {str(path)!r} must hold integer ids, got {arr.dtype}")
    return arr


def check_ids(tokens: np.ndarray, vocab_size: int, name: str, block: int = 1 << 24) -> None:
    """Raise ValueError naming ``name``, the position and the id of the first id of ``tokens`` outside
    ``0 .. vocab_size-1``. Every id is read, ``block`` at a time (a memory-mapped file is never
    loaded whole); a dtype that cannot hold a bad id (uint16 under 65536 ids) needs no reading."""
    info = np.iinfo(tokens.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return
    for start in range(0, len(tokens), block):
        part = np.asarray(tokens[start : start + block])
        if part.min() < 0 or part.max() >= vocab_size:
            i = int(np.flatnonzero((part < 0) | (part >= vocab_size))[0])
            raise ValueError(
                f"{name} holds token id {int(part[i])} at position {start + i}, outside the model's "
                f"vocabulary of {vocab_size} (ids 0..{vocab_size - 1})"
            )


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def magic_prime(n_windows: int) -> int:
    """The largest prime p <= n_windows with p % 3 == 2 (0 if there is none)."""
    for p in range(n_windows, 1, -1):
        if p % 3 == 2 and _is_prime(p):
            return p
    return 0


class TokenDataset:
    """Crops of ``ctx_len + 1`` tokens from ``tokens`` -> (input [ctx_len], target [ctx_len]) pairs."""

    def __init__(
        self, tokens: np.ndarray, ctx_len: int, seed: int = 0, vocab_size: int | None = None
    ) -> None:
        if ctx_len <= 0:
            raise ValueError(f"ctx_len must be positive, got {ctx_len}")
        if len(tokens) < ctx_len + 1:
            raise ValueError(
                f"the token stream has {len(tokens)} tokens, fewer than ctx_len + 1 = {ctx_len + 1}"
            )
        if vocab_size is not None:
            check_ids(tokens, vocab_size, "the token stream")
        self.tokens, self.ctx_len, self.seed = tokens, ctx_len, seed
        self.n_windows = (len(tokens) - 1) // ctx_len
        self.prime = magic_prime(self.n_windows)
        self.factor = int(self.prime * (math.sqrt(5) - 1) / 2)

    def __len__(self) -> int:
        return len(self.tokens)

    def start(self, g: int) -> int:
        """The start offset of global sample ``g``."""
        if self.prime >= 5:
            ii = (g + 1 + self.seed * 1_000_003) % self.prime
            return ((self.factor * ii * ii * ii) % self.prime) * self.ctx_len
        rng = np.random.default_rng((self.seed, g))  # tiny data: plain seeded random crops
        return int(rng.integers(0, len(self.tokens) - self.ctx_len))

    def sample(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.start(g)
        # a copy of the crop only: writable for torch, while a memory-mapped file stays on disk
        chunk = torch.from_numpy(np.array(self.tokens[i : i + self.ctx_len + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``first .. first+size-1`` stacked: (x [size, ctx_len], y [size, ctx_len]) int64."""
        xs, ys = zip(*(self.sample(first + b) for b in range(size)))
        return torch.stack(xs), torch.stack(ys)


def global_index(step: int, micro: int, accum: int, rank: int, world: int, micro_bsz: int) -> int:
    """First global sample of (optimiser step, micro-step, rank): one global batch is
    ``accum * world * micro_bsz`` samples, micro-steps outermost, then ranks."""
    return ((step * accum + micro) * world + rank) * micro_bsz


def split_train_val(tokens: np.ndarray, val_fraction: float, ctx_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The stream without its tail, and the tail (at least one window when ``val_fraction > 0``)."""
    if val_fraction <= 0:
        return tokens, tokens[:0]
    n_val = max(int(len(tokens) * val_fraction), ctx_len + 1)
    if n_val >= len(tokens) - ctx_len - 1:
        raise ValueError(
            f"val_fraction {val_fraction} leaves too little training data ({len(tokens)} tokens, ctx_len {ctx_len})"
        )
    return tokens[:-n_val], tokens[-n_val:]


def val_batches(
    tokens: np.ndarray, ctx_len: int, micro_bsz: int, n_batches: int
) -> list[tuple[torch.Tensor, ...]]:
    """Up to ``n_batches`` batches of consecutive non-overlapping windows spread over ``tokens``."""
    n_win = (len(tokens) - 1) // ctx_len
    if n_win <= 0:
        return []
    want = min(n_win, n_batches * micro_bsz)
    starts = np.linspace(0, n_win - 1, want).astype(np.int64) * ctx_len
    out = []
    for b in range(0, want, micro_bsz):
        rows = [
            torch.from_numpy(np.array(tokens[s : s + ctx_len + 1], dtype=np.int64))
            for s in starts[b : b + micro_bsz]
        ]
        t = torch.stack(rows)
        out.append((t[:, :-1], t[:, 1:]))
    return out
