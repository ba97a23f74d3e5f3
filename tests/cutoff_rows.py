"""The hypothesis rows that the top-p cutoff tests share (tests/test_sampling_cutoff.py: NumPy's
batched cutoff; tests/test_sampling_native.py: the C one): a few values repeated (ties), a flat tail
of tiny ones, shuffled, optionally normalised to sum to 1, with a top_p in [0, 1)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st


@st.composite
def cutoff_rows(draw: st.DrawFn, min_tail: int = 0) -> tuple[np.ndarray, float]:
    """(a float32 row of probabilities-like values, top_p); rows have ``min_tail`` .. 3000 tail values."""
    head = draw(st.lists(st.floats(min_value=0.0, max_value=1.0, width=32), min_size=1, max_size=40))
    repeat = draw(st.integers(min_value=1, max_value=4))
    tail = draw(st.floats(min_value=0.0, max_value=2.0**-10, width=32))
    tail_len = draw(st.integers(min_value=min_tail, max_value=3000))
    top_p = draw(st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
    p = np.concatenate([np.array(head * repeat, dtype=np.float32), np.full(tail_len, tail, np.float32)])
    p = np.random.default_rng(draw(st.integers(min_value=0, max_value=2**32 - 1))).permutation(p)
    if draw(st.booleans()) and p.sum() > 0:  # normalised (ties and the tail stay anywhere in the row)
        p = np.minimum(p / p.sum(), 1).astype(np.float32)
    return p, top_p
