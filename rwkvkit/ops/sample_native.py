"""The batched sampler's per-row work in C (``rwkvkit.ops._sample_cpu``): top-p cutoffs and draws.

``rwkvkit.sampling_group.draw_group`` calls ``draw`` when the extension is built (``available()``) and its
tensor form otherwise. The cutoff is exactly the reference's (``sampling.top_p_cutoff``) from
``torch.softmax``'s probabilities, found without a comparison sort (the C file's comment says how);
the draw gives the tensor form's token except where the C exp of a kept token's weight differs from
``torch.exp`` by an ulp, so every path that draws (``Sampler``, ``sample_rows``, ``sample_logits``)
goes through here when it is built, and a row drawn alone still equals the same row drawn in a batch.
Rows run on ``torch.get_num_threads()`` OpenMP threads (PyTorch's pool).
"""

from __future__ import annotations

import numpy as np
import torch

try:
    from . import _sample_cpu
except ImportError:  # pragma: no cover - depends on the build
    _sample_cpu = None

_INV_T_MAX = float(torch.finfo(torch.float32).max)


def available() -> bool:
    return _sample_cpu is not None


def lowest_at_least(bound: float) -> float:
    """The smallest float32 ``x`` for which NumPy's ``float32 array >= bound`` holds (as a Python float):
    the reference's comparisons of float32 values with a Python float, whatever precision NumPy uses."""
    f = np.float32(bound)
    for x in (np.nextafter(f, np.float32(0.0)), f):
        if (np.array([x], dtype=np.float32) >= bound)[0]:
            return float(x)
    return float(np.nextafter(f, np.float32(np.inf)))


def _bounds(top_p: float, V: int) -> dict[str, float]:
    return {"lb": lowest_at_least((1.0 - top_p) / V), "tp": lowest_at_least(top_p)}


def _threads(b: int) -> int:
    return max(1, min(torch.get_num_threads(), b))


def _check(status: torch.Tensor) -> None:
    worst = int(status.min())
    if worst == -2:
        raise MemoryError("the native sampler could not allocate its scratch buffers")
    if worst == -1:
        raise ValueError("probabilities must be in [0, 1] (no NaN) for the native top-p cutoff")


def top_p_cutoffs(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The reference's top-p cutoff (``sampling.top_p_cutoff``) of every row of probabilities [b, V]
    (float32, values in [0, 1]), as a float32 tensor [b]; ``0 <= top_p < 1``."""
    if _sample_cpu is None:
        raise RuntimeError("the native sampler is not built; reinstall rwkvkit with a C compiler")
    p = probs.detach().to("cpu", torch.float32).contiguous()
    b, V = p.shape
    out, status = torch.empty(b, dtype=torch.float32), torch.empty(b, dtype=torch.int32)
    _sample_cpu.draw_rows(
        b=b, V=V, x=None, top=None, probs=p.data_ptr(), drop=None, u=None, inv_t=1.0, tokens=None,
        cutoffs=out.data_ptr(), status=status.data_ptr(), threads=_threads(b), **_bounds(top_p, V),
    )  # fmt: skip
    _check(status)
    return out


def draw(
    x: torch.Tensor,
    temperature: float,
    top_p: float,
    drop: torch.Tensor | None,
    u: torch.Tensor,
    top: torch.Tensor | None = None,
) -> list[int]:
    """One token per row of finite float32 CPU logits ``x`` [b, V] (contiguous): top-p (``top_p < 1``) on
    ``torch.softmax(x)``, ``drop`` [b, V] bool the tokens top-k leaves out (or None), weights
    ``exp((x - max) * min(1 / temperature, float32 max))``, the inverse CDF at ``u`` [b] (float32).
    ``top`` [b] is ``x.amax(1)`` when the caller has it (torch's is faster than a C pass over cold rows)."""
    if _sample_cpu is None:
        raise RuntimeError("the native sampler is not built; reinstall rwkvkit with a C compiler")
    b, V = x.shape
    probs = torch.softmax(x, dim=1) if top_p < 1.0 else None  # the reference's probabilities
    inv_t = 1.0 if temperature == 1.0 else float(np.float32(min(1.0 / temperature, _INV_T_MAX)))
    drop8 = None if drop is None else drop.to(torch.uint8).contiguous()
    u = u.to(torch.float32).contiguous()
    top = (x.amax(1) if top is None else top).to(torch.float32).contiguous()
    tokens, status = torch.empty(b, dtype=torch.int64), torch.empty(b, dtype=torch.int32)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    _sample_cpu.draw_rows(
        b=b, V=V, x=x.data_ptr(), top=top.data_ptr(), probs=ptr(probs), drop=ptr(drop8), u=u.data_ptr(), inv_t=inv_t,
        tokens=tokens.data_ptr(), cutoffs=None, status=status.data_ptr(), threads=_threads(b),
        **_bounds(top_p, V),
    )  # fmt: skip
    _check(status)
    return tokens.tolist()
