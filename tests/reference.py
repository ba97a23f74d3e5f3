"""The reference implementation (the `rwkv` package, 0.8.32) for parity tests, on CPU in fp32.

Its configuration lives in environment variables read at import time, so they are set here once,
before the first import. Import this module instead of `rwkv` directly.

RWKV-7 is a switch of the same kind (``RWKV_V7_ON=1`` at import makes ``rwkv.model.RWKV`` the x070
class), so ``load_reference_v7`` executes a second, private copy of ``rwkv/model.py`` with the switch
set (``_v7_module``), leaving the package's own module (v4-v6) as it is. Its x070 class always runs
its functions through TorchScript, whatever ``RWKV_JIT_ON`` says.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"

import torch  # noqa: E402
from rwkv.model import RWKV as _RefRWKV  # noqa: E402


def load_reference(path: str | os.PathLike, strategy: str = "cpu fp32") -> _RefRWKV:
    """The reference model for a .pth file (the package appends '.pth' itself, so it is stripped); an
    RWKV-7 file (``blocks.0.att.r_k``) gets the x070 class (``load_reference_v7``)."""
    name = str(path)
    if "blocks.0.att.r_k" in torch.load(name, map_location="cpu", weights_only=True, mmap=True):
        return load_reference_v7(path, strategy)
    name = name[: -len(".pth")] if name.endswith(".pth") else name
    return _RefRWKV(model=name, strategy=strategy, verbose=False)


def load_reference_v7(path: str | os.PathLike, strategy: str = "cpu fp32"):
    """The reference's RWKV-7 (x070) model for a .pth file."""
    name = str(path)
    name = name[: -len(".pth")] if name.endswith(".pth") else name
    with warnings.catch_warnings():  # TorchScript's deprecation notices, once per model
        warnings.simplefilter("ignore", DeprecationWarning)
        return _v7_module().RWKV_x070(name, strategy)


@functools.cache
def _v7_module():
    """``rwkv/model.py`` executed again as a module of its own, with RWKV_V7_ON=1 during its import."""
    origin = importlib.util.find_spec("rwkv.model").origin
    spec = importlib.util.spec_from_file_location("_rwkv_model_x070", origin)
    module = importlib.util.module_from_spec(spec)
    before = os.environ.get("RWKV_V7_ON")
    os.environ["RWKV_V7_ON"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            spec.loader.exec_module(module)
    finally:
        if before is None:
            del os.environ["RWKV_V7_ON"]
        else:
            os.environ["RWKV_V7_ON"] = before
    return module


def reference_state_from(state, config) -> list[torch.Tensor]:
    """An rwkvkit RWKV-7 ``State`` (batch row 0) as the reference's per-layer list [att shift, wkv, ffn
    shift] (v7's wkv is laid out as the reference's, value x key)."""
    out = []
    for i in range(config.n_layer):
        out += [state["att_shift"][i, 0].float().clone(), state["wkv"][i, 0].float().clone()]
        out.append(state["ffn_shift"][i, 0].float().clone())
    return out


def reference_logits(ref: _RefRWKV, tokens: list[int], state=None) -> tuple[torch.Tensor, list]:
    """Logits at every position [T, V] float32 and the reference's state list after the sequence."""
    with torch.no_grad():
        if len(tokens) == 1:
            out, state = ref.forward(tokens, state)
            return out.float().unsqueeze(0), state
        out, state = ref.forward(tokens, state, full_output=True)
        return out.float(), state
