"""``rwkvkit eval perplexity FILE...``: tokens, nats per token, perplexity and bits per byte of text
files of any length.

Each file is one document: it is scored after end-of-document (token 0), every token given all
the tokens before it, streamed through the recurrent state (``scoring.rolling_loglikelihood``).
The file is read and tokenized in blocks as the model goes, so memory does not grow with its
length: a block's tokens are kept only up to the last one that starts at least a maximal token
length before the block's end (greedy longest match cannot see further than that), and the rest
is tokenized again with the next block: the ids are exactly those of tokenizing the whole file.

Bits per byte = total negative log-likelihood / ln 2 / UTF-8 bytes: comparable across tokenizers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write, check_output
from ..scoring import DEFAULT_CHUNK_LEN, rolling_loglikelihood
from .common import add_model_args, load_from_args

EOD = 0
BLOCK_BYTES = 1 << 20
MARGIN = 256  # >= the longest token a vocabulary file may hold (255 bytes)


@dataclass
class FileScore:
    file: str
    bytes: int
    tokens: int
    logprob: float  # natural log, summed over the tokens
    seconds: float

    @property
    def nats_per_token(self) -> float:
        return -self.logprob / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return -self.logprob / math.log(2) / self.bytes if self.bytes else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """The figures for JSON: those an empty file does not have (no tokens, no bytes) are None."""
        d = asdict(self)
        d.update(
            nats_per_token=self.nats_per_token, perplexity=self.perplexity, bits_per_byte=self.bits_per_byte
        )
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()}


def token_lengths(tokenizer: Any) -> np.ndarray:
    """Bytes of every token id [vocab_size] (0 for id 0)."""
    return np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)


def stream_tokens(
    tokenizer: Any, path: str | os.PathLike, block: int = BLOCK_BYTES, lengths: np.ndarray | None = None
) -> Iterator[int]:
    """The token ids of a file, read and tokenized ``block`` bytes at a time: the same ids as
    tokenizing the whole file at once."""
    if block <= MARGIN:
        raise ValueError(f"block must exceed {MARGIN} bytes, got {block}")
    lens = token_lengths(tokenizer) if lengths is None else lengths
    carry = b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            buf = carry + data
            if not buf:
                return
            ids = tokenizer.encode_array(buf, np.int64)
            if not data:  # end of file: everything is final
                yield from ids.tolist()
                return
            starts = np.cumsum(lens[ids]) - lens[ids]
            n = int(np.searchsorted(starts, len(buf) - MARGIN, side="left"))  # tokens decided already
            carry = buf[int(starts[n]) if n < len(ids) else len(buf) :]
            yield from ids[:n].tolist()


def score_file(
    model: Any, tokenizer: Any, path: str, *, chunk_len: int = DEFAULT_CHUNK_LEN, bar: Any = None,
    lengths: np.ndarray | None = None,
) -> FileScore:  # fmt: skip
    """Score one file as one document (after token 0); ``bar`` (a tqdm bar in bytes) follows the model."""
    size = os.path.getsize(path)
    lens = (token_lengths(tokenizer) if lengths is None else lengths).tolist()
    t0 = time.perf_counter()
    done = [0, 0]  # bytes of the tokens handed to the model, bytes shown on the bar
    count = [0]

    def tokens() -> Iterator[int]:
        yield EOD
        for t in stream_tokens(tokenizer, path, lengths=lengths):
            done[0] += lens[t]
            count[0] += 1
            yield t

    def progress(_: int) -> None:
        if bar is not None:
            bar.update(done[0] - done[1])
            done[1] = done[0]

    s = rolling_loglikelihood(model, tokens(), chunk_len=chunk_len, progress=progress)
    assert s.tokens == count[0]
    return FileScore(path, size, s.tokens, s.logprob, time.perf_counter() - t0)


def _bar(total: int, quiet: bool) -> Any:
    if quiet:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, desc="perplexity", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``rwkvkit eval perplexity FILE...``: nats/token, perplexity and bits/byte of text files."""
    p = argparse.ArgumentParser(prog="rwkvkit eval perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="text files (each scored as one document)")
    add_model_args(p)
    p.add_argument("--chunk-len", type=int, default=DEFAULT_CHUNK_LEN, help="tokens per model call")
    p.add_argument("--output", default=None, help="also write the figures as JSON to this file")
    p.add_argument("--force", action="store_true", help="let --output replace an existing file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.chunk_len <= 0:
        p.error("--chunk-len must be positive")
    for f in args.files:
        if not os.path.isfile(f):
            why = "is a folder, not a file" if os.path.isdir(f) else "does not exist"
            print(f"rwkvkit eval perplexity: {f!r} {why}", file=sys.stderr)
            return 2
    from ..hub import ModelNotFound

    try:
        if args.output:
            check_output(args.output, "--output", force=args.force, inputs=(*args.files, args.model))
        model, tokenizer = load_from_args(args)
    except (ModelNotFound, ValueError, FileNotFoundError) as e:
        print(f"rwkvkit eval perplexity: {e}", file=sys.stderr)
        return 2
    bar = _bar(sum(os.path.getsize(f) for f in args.files), args.quiet)
    lens = token_lengths(tokenizer)
    scores = [
        score_file(model, tokenizer, f, chunk_len=args.chunk_len, bar=bar, lengths=lens) for f in args.files
    ]
    if bar is not None:
        bar.close()
    total = FileScore(
        "(all)", sum(s.bytes for s in scores), sum(s.tokens for s in scores), sum(s.logprob for s in scores),
        sum(s.seconds for s in scores),
    )  # fmt: skip
    width = max(len(s.file) for s in [*scores, total])
    print(
        f"{'file':<{width}} {'bytes':>10} {'tokens':>9} {'nats/token':>10} {'perplexity':>11} {'bits/byte':>9} {'tok/s':>7}"
    )
    for s in scores + ([total] if len(scores) > 1 else []):
        rate = s.tokens / s.seconds if s.seconds else float("nan")
        print(
            f"{s.file:<{width}} {s.bytes:>10} {s.tokens:>9} {s.nats_per_token:>10.4f} {s.perplexity:>11.3f} "
            f"{s.bits_per_byte:>9.4f} {rate:>7.0f}"
        )
    if args.output:
        figures = {"model": args.model, "files": [s.as_dict() for s in scores], "total": total.as_dict()}
        atomic_write(
            args.output, lambda tmp: Path(tmp).write_text(json.dumps(figures, indent=2, allow_nan=False))
        )
    return 0
