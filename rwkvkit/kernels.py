"""Which CPU kernels a model runs: chosen by argument, defaulted by documented environment overrides.

``Kernels`` is the choice: ``rwkvkit.load(path, kernels=Kernels(native_step=False))`` or
``model.set_kernels(amx_matmul=False)``. The model makes its choice active for the length of each
forward call (``using``), and every fast path asks ``active()`` before it runs; outside a model call
(a module or op used alone) the default applies. Whether a chosen path can run at all (built, the
CPU's features, dtype, shapes, gradients) is decided where the path is; ``model.describe()`` reports
both, per part of the model.

The environment variables below only change the defaults. They are read here and nowhere else in the
Python code (the C kernels receive flags from their Python modules), once, when this module is
imported:

======================== ======================================================================
RWKVKIT_NATIVE_STEP=0    ``Kernels.native_step`` defaults to False (one-token calls run the PyTorch
                         modules instead of the one-call C step)
RWKVKIT_AMX_MATMUL=0     ``Kernels.amx_matmul`` defaults to False (bf16 prompts' matrices take
                         F.linear / oneDNN instead of the AMX kernel)
RWKVKIT_FUSED=0          ``Kernels.fused`` defaults to False (the element-wise chains between the
                         matrices run as PyTorch ops)
RWKVKIT_MALLOC_TUNE=0    ``load(..., tune_malloc=None)`` leaves glibc's malloc thresholds alone
RWKVKIT_PORTABLE_KERNELS=1  no AMX tiles anywhere and the one-token step's plain-C matrix
                         kernels instead of its AVX-512 ones (tests of the fallbacks; process-wide,
                         see ``set_portable``)
======================== ======================================================================
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace


def _flag(name: str, default: bool) -> bool:
    """An override: unset or empty -> default; "0" -> False; anything else -> True."""
    value = os.environ.get(name, "")
    return default if value == "" else value != "0"


@dataclass(frozen=True)
class Kernels:
    """The fast CPU paths a model may take (each still needs its own conditions to run)."""

    native_step: bool = True  # T == 1 inference calls: every layer and the head in one C call
    amx_matmul: bool = True  # bf16 prompts' matrix products on AMX tiles (CPUs with AMX-BF16)
    fused: bool = True  # the element-wise chains between the matrices in fused C passes

    @classmethod
    def default(cls) -> Kernels:
        """The defaults after the environment overrides."""
        return _DEFAULT

    def replace(self, **changes: bool) -> Kernels:
        unknown = sorted(set(changes) - set(self.__dataclass_fields__))
        if unknown:
            raise TypeError(
                f"unknown kernel choices {unknown}; choose from {sorted(self.__dataclass_fields__)}"
            )
        return replace(self, **changes)


_DEFAULT = Kernels(
    native_step=_flag("RWKVKIT_NATIVE_STEP", True),
    amx_matmul=_flag("RWKVKIT_AMX_MATMUL", True),
    fused=_flag("RWKVKIT_FUSED", True),
)
MALLOC_TUNE = _flag("RWKVKIT_MALLOC_TUNE", True)  # load()'s default for tune_malloc
PORTABLE = _flag("RWKVKIT_PORTABLE_KERNELS", False)  # the C modules' setting at import (set_portable)

_ACTIVE: ContextVar[Kernels] = ContextVar("rwkvkit_kernels", default=_DEFAULT)


def active() -> Kernels:
    """The choice in force: the running model's, else the defaults."""
    return _ACTIVE.get()


@contextmanager
def using(kernels: Kernels) -> Iterator[Kernels]:
    """Make ``kernels`` the choice in force inside the ``with`` block (this thread / task only)."""
    token = _ACTIVE.set(kernels)
    try:
        yield kernels
    finally:
        _ACTIVE.reset(token)


def set_portable(flag: bool) -> None:
    """Process-wide: make the C kernels use their portable code (no AMX tiles, the one-token step's
    plain-C matrix kernels) or, with False, the best the CPU has. AMX permission and the CPU's features are per process, hence not per model."""
    global PORTABLE
    PORTABLE = bool(flag)
    from .ops import decode, fused, matmul

    for mod in (decode, fused, matmul):
        mod.configure(PORTABLE)
