"""The MQAR task of ``rwkvkit.experiments.mqar`` (Zoology's multi-query associative recall, our own
code): ``MQARTask`` (vocabulary, length, pairs), ``generate`` (examples with their labels: the value at
each query position, ``IGNORE`` elsewhere), ``Stream`` (fresh training batches that never equal a
held-out example) and ``held_out`` (the validation and test sets). The rules are in ``mqar``'s
docstring."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100


# ---- the task -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MQARTask:
    vocab_size: int
    seq_len: int  # T
    num_kv_pairs: int  # N
    power_a: float = 0.01

    def __post_init__(self) -> None:
        V, T, N = self.vocab_size, self.seq_len, self.num_kv_pairs
        if T % 2:
            raise ValueError(f"MQAR: seq_len must be even, got {T}")
        if N < 1 or 4 * N > T:
            raise ValueError(
                f"MQAR: need 1 <= num_kv_pairs and 4 * num_kv_pairs <= seq_len, got N={N}, T={T}"
            )
        if V // 2 - 1 < N or V - V // 2 < N:
            raise ValueError(f"MQAR: vocabulary {V} has too few keys or values for {N} pairs")
        if V <= N + 1:
            raise ValueError(f"MQAR: vocabulary {V} leaves no filler tokens")

    @property
    def slots(self) -> int:
        """Query slots after the pairs (even positions of the query region)."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2

    def gap_probs(self) -> np.ndarray:
        """Zoology's power law over the slots: p_i ~ a * i^(a-1), i = 1 .. slots."""
        i = np.arange(1, self.slots + 1, dtype=np.float64)
        p = self.power_a * i ** (self.power_a - 1)
        return p / p.sum()


def _distinct(rng: np.random.Generator, n: int, lo: int, hi: int, k: int) -> np.ndarray:
    """[n, k] ints, each row k distinct values from [lo, hi), uniformly."""
    return np.argsort(rng.random((n, hi - lo)), axis=1)[:, :k] + lo


def generate(task: MQARTask, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples: (inputs [n, T] int64, labels [n, T] int64, ``IGNORE`` except at the queries)."""
    V, T, N = task.vocab_size, task.seq_len, task.num_kv_pairs
    keys = _distinct(rng, n, 1, V // 2, N)
    values = _distinct(rng, n, V // 2, V, N)
    # N distinct slots per row, drawn one after the other with the power-law weights (as numpy's
    # choice(replace=False, p=...)); the Gumbel-top-k trick draws the same distribution at once.
    gumbel = -np.log(-np.log(rng.random((n, task.slots))))
    gaps = np.argsort(-(np.log(task.gap_probs()) + gumbel), axis=1)[:, :N]
    # fillers: uniform over the vocabulary without this row's keys
    inputs = rng.integers(0, V, size=(n, T))
    while True:
        hit = (inputs[:, :, None] == keys[:, None, :]).any(-1)
        if not hit.any():
            break
        inputs[hit] = rng.integers(0, V, size=int(hit.sum()))
    inputs[:, 0 : 2 * N : 2] = keys
    inputs[:, 1 : 2 * N : 2] = values
    rows = np.arange(n)[:, None]
    qpos = 2 * N + 2 * gaps
    inputs[rows, qpos] = keys
    labels = np.full((n, T), IGNORE, dtype=np.int64)
    labels[rows, qpos] = values
    return inputs.astype(np.int64), labels


class Stream:
    """Fresh training batches; any example equal to one of ``exclude`` (test/validation) is redrawn."""

    def __init__(self, task: MQARTask, seed: int, exclude: list[np.ndarray]) -> None:
        self.task, self.rng = task, np.random.default_rng([seed, 1])
        self.exclude = {row.tobytes() for x in exclude for row in x}
        self.redrawn = 0

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = generate(self.task, size, self.rng)
        while True:
            bad = [i for i, row in enumerate(x) if row.tobytes() in self.exclude]
            if not bad:
                return x, y
            self.redrawn += len(bad)
            x[bad], y[bad] = generate(self.task, len(bad), self.rng)


def held_out(task: MQARTask, n: int, seed: int, which: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed evaluation sets: ``which`` 2 = validation, 3 = test (their own random streams)."""
    return generate(task, n, np.random.default_rng([seed, which]))
