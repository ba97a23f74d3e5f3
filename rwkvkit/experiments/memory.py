"""Peak memory of one call: what a function allocates through PyTorch while it runs, CPU or GPU.

- CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of
  PyTorch's CPU allocator (size and time); the peak is the largest running sum of those sizes. Memory
  allocated before the call (its inputs) is not counted; memory allocated outside PyTorch's allocator
  (oneDNN scratch buffers, OpenMP stacks, malloc inside C extensions) is not seen.
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before the call (the same meaning: the call's own peak).

``peak_bytes(fn, device)`` returns ``(fn's result, peak bytes)``. The profiler slows the call down, so
time and memory come from separate runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _allocations(prof) -> list[tuple[int, int]]:
    """(time ns, signed bytes) of every CPU allocation event the profiler saw, in time order."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            e = node.extra_fields
            if e.device.type == "cpu":
                events.append((node.start_time_ns, int(e.alloc_size)))
        stack.extend(node.children)
    events.sort()
    return events


def peak_cpu_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` under the profiler; return its result and the peak of its CPU allocations."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    peak = running = 0
    for _, size in _allocations(prof):
        running += size
        peak = max(peak, running)
    return out, peak


def peak_cuda_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """``fn()``'s result and the peak bytes it allocated on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        return peak_cuda_bytes(fn, device)
    return peak_cpu_bytes(fn)
