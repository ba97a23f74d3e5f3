"""Process-level settings for fast CPU inference.

``tune_malloc()``: glibc's malloc returns large freed blocks to the system and maps fresh pages for
the next ones, so every prompt pays a few thousand page faults for its activations (measured here:
about 2,300 minor faults and 5% of a 512-token prefill of a 0.1B model). Raising the mmap and trim
thresholds keeps freed blocks for reuse (the process keeps up to a few hundred MB of freed memory
instead of returning it). ``rwkvkit.load`` calls it once for CPU models; it affects the whole process,
only on glibc; ``RWKVKIT_MALLOC_TUNE=0`` in the environment (read in ``rwkvkit.kernels``, where every
override is read) makes its callers skip it. The trainer calls it
with thresholds sized to its logits (a V=65536 batch's fp32 logits and their gradient are hundreds
of MB: above 64 MB they would be mapped and page-faulted in afresh every step; measured here, Finch
L2 C256 V65536 ctx 256 batch 4: 433k minor faults and 5.3 s per step untuned, 21k and 4.1 s sized).
``trim_malloc()`` returns freed memory to the system on demand (the server calls it when idle).
``freeze_gc()``: ``rwkvkit serve`` moves everything alive after loading out of the cyclic garbage
collector's reach, so its full collections stop walking the model's objects between decode steps
(measured: 2.3% of a 16-row decode step, 0 after).
"""

from __future__ import annotations

import ctypes
import gc
import platform

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2**31 - 1  # mallopt takes an int
_applied: tuple[int, int, int] | None = None  # the thresholds in force (mmap, trim, top pad)


def tune_malloc(
    mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20, top_pad: int = 64 << 20
) -> bool:
    """Keep freed blocks below ``mmap_threshold`` bytes for reuse; True if glibc took the settings.

    Thresholds only ever go up: a later call with larger ones (the trainer sizes them to its logits)
    raises them, a call with smaller ones leaves the larger ones in force.
    """
    global _applied
    if platform.system() != "Linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    want = tuple(min(int(v), _INT_MAX) for v in (mmap_threshold, trim_threshold, top_pad))
    if _applied is not None:
        want = tuple(max(a, b) for a, b in zip(want, _applied))
        if want == _applied:
            return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(
            libc.mallopt(opt, ctypes.c_int(val)) == 1
            for opt, val in zip((_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, _M_TOP_PAD), want)
        )
    except (OSError, AttributeError):
        return False
    if ok:
        _applied = want  # type: ignore[assignment]
    return ok


def trim_malloc() -> bool:
    """Hand freed heap memory back to the system (glibc ``malloc_trim(0)``, every arena, including
    free pages in the middle of a heap); True if it ran. For long-lived processes that ``tune_malloc``:
    the server calls it whenever its engine runs out of work, so its resident size levels off."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def freeze_gc() -> None:
    """Collect once, then exempt every object alive now from later collections (``gc.freeze``): for a
    process that loads a model and keeps it to the end. Objects created later are collected as usual."""
    gc.collect()
    gc.freeze()
