"""The one table of dtype names: what ``--dtype`` options, messages and benchmark rows call them.

``DTYPES`` maps the names to torch dtypes (fp32, bf16, fp16: the model dtypes ``rwkvkit.load``
takes); ``dtype_from_name`` reads a name with an error that lists the choices; ``name_of`` goes back.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES: dict[torch.dtype, str] = {dt: name for name, dt in DTYPES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    """``"bf16"`` -> ``torch.bfloat16``; ValueError naming the choices for anything else."""
    dt = DTYPES.get(name)
    if dt is None:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return dt


def name_of(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (other dtypes: their torch name without the prefix)."""
    return NAMES.get(dtype, str(dtype).removeprefix("torch."))
