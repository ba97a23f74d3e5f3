"""Small vocabularies cut from the World vocabulary, and the demo model's token file.

A 65536-token vocabulary makes the embedding and head of a small model weigh 2*65536*C parameters,
more than the model itself. ``subset_vocab`` keeps the 256 single bytes plus the World tokens that
the greedy World tokenizer uses most on a corpus, renumbered 1..K-1 in World order, and
``write_vocab`` writes them in the World file format (``<id> <literal> <byte length>``), so that
``rwkvkit.Tokenizer(path)`` (the same greedy longest-match) encodes with it exactly. Id 0 stays the
end-of-document token.

``prepare_demo_data`` builds the demo model's data from ``rwkvkit.data.corpora.demo_corpus``:
documents cut into pieces of at most ``piece_chars`` characters, shuffled with a fixed seed (so the
held-out tail of the token stream samples every source), encoded, each ended by token 0, and saved as
one flat ``uint16`` ``.npy`` token file next to the vocabulary.

Run ``python -m rwkvkit.train.vocab OUT_DIR [--vocab-size 8192]`` (``scripts/train_demo.sh`` does).
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


def _world_tokens() -> list[bytes]:
    from rwkvkit.tokenizer.vocab import load_vocab

    return load_vocab(None)


def _encoder(tokens: Sequence[bytes]):
    """A greedy longest-match encoder over ``tokens`` (rwkvkit's tokenizer core, native when built)."""
    try:
        from rwkvkit.tokenizer._native import Core  # type: ignore[import-not-found]
    except ImportError:
        from rwkvkit.tokenizer._pure import PyCore as Core
    return Core(list(tokens)).encode


def subset_vocab(docs: Iterable[str], size: int, world: Sequence[bytes] | None = None) -> list[bytes]:
    """The 256 single bytes plus the ``size - 257`` World tokens most used on ``docs``.

    Returns a list indexed by the new id: ``[b"", byte 0, ..., byte 255, token, ...]`` of length ``size``.
    """
    if size < 258:
        raise ValueError(f"vocabulary size must be at least 258 (id 0 + 256 bytes + 1), got {size}")
    world = list(world if world is not None else _world_tokens())
    if len(world) < size:
        raise ValueError(f"cannot cut {size} tokens from a vocabulary of {len(world)}")
    encode = _encoder(world)
    counts: Counter[int] = Counter()
    for doc in docs:
        counts.update(encode(doc))
    singles = {bytes([b]) for b in range(256)}
    ranked = [i for i, _ in counts.most_common() if world[i] and world[i] not in singles]
    chosen = sorted(ranked[: size - 257], key=lambda i: i)  # keep World order
    if len(chosen) < size - 257:  # a tiny corpus: fill with the shortest unused World tokens
        used = set(chosen)
        rest = sorted(
            (i for i in range(1, len(world)) if world[i] and i not in used and world[i] not in singles),
            key=lambda i: (len(world[i]), i),
        )
        chosen = sorted(chosen + rest[: size - 257 - len(chosen)])
    return [b""] + [bytes([b]) for b in range(256)] + [world[i] for i in chosen]


def _literal(token: bytes) -> str:
    try:
        return repr(token.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(token)


def write_vocab(tokens: Sequence[bytes], path: str | Path) -> None:
    """Write ``tokens`` (index = id, ``tokens[0]`` unused) in the World vocabulary file format."""
    lines = [f"{i} {_literal(t)} {len(t)}" for i, t in enumerate(tokens) if i > 0]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _pieces(docs: Iterable[str], piece_chars: int) -> list[str]:
    out = []
    for doc in docs:
        while len(doc) > piece_chars:
            cut = doc.rfind("\n\n", 0, piece_chars)
            cut = cut + 2 if cut > piece_chars // 2 else piece_chars
            out.append(doc[:cut])
            doc = doc[cut:]
        if doc.strip():
            out.append(doc)
    return out


def prepare_demo_data(
    out_dir: str | Path,
    vocab_size: int = 8192,
    piece_chars: int = 16384,
    seed: int = 0,
    stdlib_max_bytes: int | None = None,
) -> dict:
    """Write ``vocab.txt``, ``tokens.npy`` (flat uint16, 0 after each piece) and ``data.json`` in ``out_dir``."""
    from rwkvkit.data.corpora import jane_austen, python_stdlib, world_english_bible

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = {
        "python_stdlib": list(python_stdlib(max_bytes=stdlib_max_bytes)),
        "jane_austen": list(jane_austen()),
        "world_english_bible": list(world_english_bible()),
    }
    docs = [d for ds in sources.values() for d in ds]
    if not docs:
        raise RuntimeError("no corpus text found (Python stdlib sources missing?)")
    tokens = subset_vocab(docs, vocab_size)
    write_vocab(tokens, out / "vocab.txt")
    pieces = _pieces(docs, piece_chars)
    random.Random(seed).shuffle(pieces)
    encode = _encoder(tokens)
    ids: list[int] = []
    for p in pieces:
        ids.extend(encode(p))
        ids.append(0)
    arr = np.asarray(ids, dtype=np.uint16)
    np.save(out / "tokens.npy", arr)
    info = {
        "vocab_size": vocab_size,
        "n_tokens": int(arr.size),
        "n_pieces": len(pieces),
        "chars": {k: sum(map(len, v)) for k, v in sources.items()},
        "seed": seed,
        "piece_chars": piece_chars,
    }
    (out / "data.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkvkit.train.vocab", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--piece-chars", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stdlib-max-bytes", type=int, default=None)
    a = ap.parse_args(argv)
    info = prepare_demo_data(a.out_dir, a.vocab_size, a.piece_chars, a.seed, a.stdlib_max_bytes)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
