"""The GPU backend's mapping onto flash-linear-attention's conventions, checked on the CPU.

``rwkvkit.ops.fla_kernels`` hands WKV-6 and WKV-7 to fla's chunked Triton kernels, which only run on
CUDA (``tests/test_gpu_fla.py`` runs them when a GPU is there). What can go wrong in the mapping (the
``scale``, the log decay, the bonus's layout, RWKV-7's state transposed, which of a/b is which) does
not need the kernels: fla ships plain PyTorch recurrences, the ones its own tests hold the kernels to
(``fla/ops/rwkv6/recurrent_naive.py``, ``fla/ops/generalized_delta_rule/dplr/naive.py``). Here they
stand in for ``chunk_rwkv6`` / ``chunk_rwkv7`` behind the kernels' exact signatures (time-major
[B, T, H, K] inputs, ``scale``, ``initial_state`` [B, H, K, V]), as fla's tests call them: transposed
to head-major, and the delta rule's query divided back by the K^-0.5 its reference applies itself.
rwkvkit's wrappers then run unchanged on the CPU and must give the naive WKV's outputs, final states
and gradients. The files are loaded alone: fla's package imports Triton, which a CPU machine lacks.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from rwkvkit.ops import fla_kernels
from rwkvkit.ops.wkv6 import wkv6_naive
from rwkvkit.ops.wkv7 import wkv7_naive
from tests.test_ops_wkv import assert_close_rel, inputs6
from tests.test_ops_wkv7 import inputs7


def _fla_dir() -> Path | None:
    spec = importlib.util.find_spec("fla")  # finds the package without running its __init__
    return (
        None
        if spec is None or not spec.submodule_search_locations
        else Path(spec.submodule_search_locations[0])
    )


FLA = _fla_dir()
NAIVE6 = "ops/rwkv6/recurrent_naive.py"
NAIVE7 = "ops/generalized_delta_rule/dplr/naive.py"
pytestmark = pytest.mark.skipif(
    FLA is None or not all((FLA / f).is_file() for f in (NAIVE6, NAIVE7)),
    reason="needs the fla extra (fla-core 0.6.0) and its reference recurrences",
)


def _load(rel: str, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, FLA / rel)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _hm(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # [B, T, H, K] <-> [B, H, T, K]


@pytest.fixture
def fla_on_cpu(monkeypatch):
    """``fla.ops.rwkv6.chunk_rwkv6`` and ``fla.ops.rwkv7.chunk_rwkv7`` as fla's reference recurrences;
    records the keyword arguments each was called with."""
    naive6 = _load(NAIVE6, "_fla_rwkv6_naive").naive_recurrent_rwkv6
    dplr = _load(NAIVE7, "_fla_dplr_naive").dplr_recurrence
    calls: dict[str, dict] = {}

    def chunk_rwkv6(r, k, v, w, u, scale=None, initial_state=None, output_final_state=False):
        calls["rwkv6"] = {"scale": scale, "state_shape": tuple(initial_state.shape)}
        o, h = naive6(_hm(r), _hm(k), _hm(v), _hm(w), u, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state)  # fmt: skip
        return _hm(o), h

    def chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False):
        # fla: chunk_dplr_delta_rule(q=r, k, v, a, b, gk=w, scale); its naive form scales q by K^-0.5
        calls["rwkv7"] = {"scale": scale, "state_shape": tuple(initial_state.shape)}
        q = r * (scale * r.shape[-1] ** 0.5)
        o, h = dplr(_hm(q), _hm(k), _hm(v), _hm(a), _hm(b), _hm(w), initial_state=initial_state,
                    output_final_state=output_final_state)  # fmt: skip
        return _hm(o), h

    mods = {name: types.ModuleType(name) for name in ("fla", "fla.ops", "fla.ops.rwkv6", "fla.ops.rwkv7")}
    mods["fla.ops.rwkv6"].chunk_rwkv6 = chunk_rwkv6
    mods["fla.ops.rwkv7"].chunk_rwkv7 = chunk_rwkv7
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def _grads(fn, xs, seed=0):
    """Outputs and the gradients of <y, gy> + <state, gs> for every input (fixed random cotangents)."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y, s = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    gy, gs = (
        torch.randn(y.shape, generator=g, dtype=y.dtype),
        torch.randn(s.shape, generator=g, dtype=s.dtype),
    )
    ((y * gy).sum() + (s * gs).sum()).backward()
    return y.detach(), s.detach(), [x.grad for x in xs]


def _same(fla_fn, naive_fn, xs, names):
    y, s, gr = _grads(fla_fn, xs)
    y0, s0, gr0 = _grads(naive_fn, xs)
    assert y.dtype == torch.float32 and s.dtype == torch.float32 and s.shape == s0.shape
    assert_close_rel(y, y0, 1e-4, "y")
    assert_close_rel(s, s0, 1e-4, "final state")
    for n, g, g0 in zip(names, gr, gr0):
        assert g is not None, f"no gradient reaches {n}"
        assert_close_rel(g, g0, 1e-4, f"d{n}")


def test_wkv6_mapping_matches_fla_reference(fla_on_cpu):
    # Finch's decays (to exp(-20) per token), a random bonus per head, a non-zero start state
    xs = list(inputs6(2, 24, 3, 16, "realistic", seed=5))
    _same(fla_kernels.wkv6_fla, wkv6_naive, xs, "r k v w u state".split())
    assert fla_on_cpu["rwkv6"] == {"scale": 1.0, "state_shape": (2, 3, 16, 16)}


def test_wkv7_mapping_matches_fla_reference(fla_on_cpu):
    # the model's a/b (a = -kk, b = kk * a_coef) and decays; the state is [value, key] in rwkvkit
    xs = list(inputs7(2, 24, 3, 16, "model", seed=6))
    _same(fla_kernels.wkv7_fla, wkv7_naive, xs, "r w k v a b state".split())
    assert fla_on_cpu["rwkv7"] == {"scale": 1.0, "state_shape": (2, 3, 16, 16)}


def test_wkv7_state_is_transposed_for_fla(fla_on_cpu):
    """A non-symmetric start state and independent a, b: swapping a and b, or passing rwkvkit's [V, K]
    state untransposed, would give other values (this is what the check above would catch)."""
    r, w, k, v, a, b, s = inputs7(1, 6, 2, 8, "model", ab="raw", seed=7)
    y, sT = fla_kernels.wkv7_fla(r, w, k, v, a, b, s)
    y0, s0 = wkv7_naive(r, w, k, v, a, b, s)
    assert_close_rel(y, y0, 1e-5, "y")
    assert_close_rel(sT, s0, 1e-5, "final state")
    y_wrong, _ = wkv7_naive(r, w, k, v, a, b, s.transpose(-1, -2).contiguous())
    y_swapped, _ = wkv7_naive(r, w, k, v, b, a, s)
    assert (y_wrong - y0).abs().max() > 1e-2 and (y_swapped - y0).abs().max() > 1e-2
