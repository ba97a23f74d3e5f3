"""The registry of RWKV versions: the one place that lists them.

Adding a version is a module that defines its time-mix, channel-mix and a ``spec.Version`` subclass
(see ``spec.py`` for what it declares), plus one line in ``VERSIONS`` below. Nothing else in the
package names a version number: it asks ``get(version)`` or ``detect(state_dict)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..config import CheckpointError
from . import rwkv4, rwkv5, rwkv6, rwkv7
from .spec import Version

VERSIONS: dict[int, Version] = {
    4: rwkv4.SPEC,
    5: rwkv5.SPEC,
    6: rwkv6.SPEC,
    7: rwkv7.SPEC,
}


def get(version: int) -> Version:
    """The spec of ``version``; ValueError naming the supported ones otherwise."""
    spec = VERSIONS.get(version) if isinstance(version, int) else None
    if spec is None:
        raise ValueError(f"unsupported RWKV version {version!r}: rwkvkit supports {supported()}")
    return spec


def supported() -> str:
    return ", ".join(str(v) for v in VERSIONS)


def all_sizes() -> set[str]:
    """Every size name some registered version declares (``ModelConfig`` ignores other versions')."""
    return {name for spec in VERSIONS.values() for name in spec.sizes}


def detect(sd: Mapping[str, torch.Tensor]) -> Version:
    """The version whose layout ``sd`` has; CheckpointError naming what was found otherwise."""
    found = [spec for spec in VERSIONS.values() if spec.detect(sd)]
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"ambiguous checkpoint: it fits {[s.name for s in found]}")
    att = "blocks.0.att."
    keys = sorted(k[len(att) :] for k in sd if k.startswith(att))
    raise CheckpointError(f"unknown RWKV layout: block 0 time-mix keys are {keys}")


def lr_multiplier(param_name: str) -> float:
    """The learning-rate multiplier of a parameter (by the last part of its name), 1 by default."""
    return _LR_MULT.get(param_name.rsplit(".", 1)[-1], 1.0)


def _merged_lr_mult() -> dict[str, float]:
    out: dict[str, float] = {}
    for spec in VERSIONS.values():
        for name, mult in spec.lr_mult.items():
            if out.setdefault(name, mult) != mult:
                raise AssertionError(f"versions disagree on the learning-rate multiplier of {name!r}")
    return out


_LR_MULT = _merged_lr_mult()
