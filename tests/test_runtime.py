"""Process-level settings: the malloc tuning that ``rwkvkit.load`` applies for CPU models."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from rwkvkit import runtime


def test_opt_out_by_environment(monkeypatch):
    """RWKVKIT_MALLOC_TUNE=0 is read where every override is (rwkvkit.kernels) and makes the callers
    skip the tuning: load's default and the trainer's."""
    import subprocess
    import sys

    code = "from rwkvkit import kernels; print(kernels.MALLOC_TUNE)"
    env = {**__import__("os").environ, "RWKVKIT_MALLOC_TUNE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from rwkvkit import kernels
    from rwkvkit.train import trainer

    monkeypatch.setattr(kernels, "MALLOC_TUNE", False)
    monkeypatch.setattr(runtime, "_applied", None)
    assert trainer._tune_malloc_for(1 << 30) is False
    assert runtime._applied is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_activations_are_reused_without_page_faults():
    assert runtime.tune_malloc() is True
    assert runtime.tune_malloc() is True  # idempotent

    def faults() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            t = torch.empty(8 << 20, dtype=torch.uint8)  # 8 MB: above glibc's default mmap threshold
            t.fill_(1)
            del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults(), faults()  # the heap grows to hold the block once
    assert faults() < 200  # 5 x 2048 pages would fault if each block were mapped afresh


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_trainer_sizes_the_thresholds_to_its_logits():
    """A V=65536 batch's logits are hundreds of MB: above load's 64 MB threshold they were mapped and
    page-faulted in afresh every step; the trainer raises the thresholds to fit them."""
    from rwkvkit.train.trainer import _tune_malloc_for

    def faults() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            t = torch.empty(96 << 20, dtype=torch.uint8)  # 96 MB, like 1 x 384 x 65536 fp32 logits
            t.fill_(1)
            del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert _tune_malloc_for(96 << 20) is True
    faults(), faults()
    # 3 x 24576 pages if each block were mapped afresh. The best of three rounds: a mapping another
    # thread of the test process placed above the heap can make glibc map one block once
    assert min(faults() for _ in range(3)) < 2000
    assert runtime.tune_malloc() is True  # a later default call does not lower them again
    assert runtime._applied[0] >= 192 << 20
    assert runtime.trim_malloc() is True
