"""Shared ``argparse`` types for the commands' numeric and list options.

Each is a ``type=`` function: a bad value becomes argparse's one-line usage error (exit code 2)
naming the option and the problem, never a traceback and never after the work has started.

- ``positive_int`` / ``non_negative_int`` / ``non_negative_float``: numbers with a lower bound.
- ``csv_list``: a comma-separated, non-empty list of non-empty names.
- ``csv_choices(choices)``: the same, each name one of ``choices``, no name twice.

``check_folder`` is the matching check of a folder a command will create or write in.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path


def _int(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {v!r}") from None


def positive_int(v: str) -> int:
    """An integer >= 1."""
    n = _int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def non_negative_int(v: str) -> int:
    """An integer >= 0."""
    n = _int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def non_negative_float(v: str) -> float:
    """A finite number >= 0."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {v!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {v}")
    return x


def csv_list(v: str) -> list[str]:
    """``a,b,c`` -> ["a", "b", "c"]; an empty list or an empty item is an error."""
    items = [s.strip() for s in v.split(",")]
    if not v.strip() or any(not s for s in items):
        raise argparse.ArgumentTypeError(f"needs a comma-separated list of names, got {v!r}")
    return items


def csv_choices(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A ``type=`` for a comma-separated subset of ``choices`` (non-empty, known names, none twice)."""

    def parse(v: str) -> list[str]:
        items = csv_list(v)
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        twice = sorted({s for s in items if items.count(s) > 1})
        if twice:
            raise argparse.ArgumentTypeError(f"{', '.join(twice)} given more than once")
        return items

    parse.__name__ = "list"  # argparse's fallback message says "invalid list value"
    return parse


def positive_float(v: str) -> float:
    """A finite number > 0."""
    x = non_negative_float(v)
    if x == 0:
        raise argparse.ArgumentTypeError("must be a number > 0, got 0")
    return x


def check_folder(path: str | Path, what: str) -> Path:
    """A folder a command will create or write in: a ValueError when it, or the nearest part of its
    path that exists, is not a folder (checked before the work, not found at its end)."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                raise ValueError(f"{what} {str(p)!r}: {str(q)!r} is a file, not a folder")
            break
    return p
