"""WKV-6 and WKV-7 on CUDA through flash-linear-attention's chunked Triton kernels (optional extra).

Mapped to fla-core 0.6.0 (the ops package of flash-linear-attention 0.6.0; ``pip install
'rwkvkit[fla]'``), whose conventions differ from rwkvkit's in these ways, each read in its source:

- ``fla.ops.rwkv6.chunk_rwkv6(r, k, v, w, u, scale, initial_state, output_final_state)``:
  layouts [B, T, H, K] as ours; ``w`` the LOG decay, as ours; ``u`` the bonus [H, K]; ``scale``
  defaults to K^-0.5 and RWKV needs 1.0; the state [B, H, K(key), V(value)] is our Finch layout.
- ``fla.ops.rwkv7.chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state)``: a thin
  wrapper of ``fla.ops.generalized_delta_rule.chunk_dplr_delta_rule(q=r, k, v, a, b, gk=w)``, whose
  step is X = exp(gk) X + k^T v + b^T (a X) with X [K, V] and o = scale * q X: our recurrence with
  the state TRANSPOSED (ours is the reference's [V, K]), ``w`` again the log decay, scale 1.0 for
  RWKV. Without ``lower_bound`` it picks its safe 16-token chunks (exact for any w < 0).

Dtypes (fp64 is not supported by the kernels and runs in fp32): RWKV-7's r, k, v, a, b go in their
shared dtype when it is bf16, fp16 or fp32, else in fp32, and its log decay always in fp32 (the
combination fla's own delta-rule tests use); RWKV-6's r, k, v, w, u go in one dtype, as in fla's
RWKV-6 tests: their shared one, else fp32. Outputs are returned in fp32 like every other backend. Both functions are
differentiable (fla's own backward kernels, the initial state included).
"""

from __future__ import annotations

import functools
import warnings

import torch

Tensor = torch.Tensor
INSTALL = "pip install 'rwkvkit[fla]' (flash-linear-attention 0.6.0: fla-core and Triton, CUDA only)"


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    """None when fla's RWKV-6/7 kernels import, else why not (fla missing, Triton missing, ...)."""
    try:
        import fla.ops.rwkv6  # noqa: F401
        import fla.ops.rwkv7  # noqa: F401
    except Exception as e:  # ImportError, or a Triton/driver error raised while importing
        return f"{type(e).__name__}: {e}"
    return None


def available() -> bool:
    """True when flash-linear-attention's RWKV kernels import and a CUDA device is present."""
    return torch.cuda.is_available() and _import_error() is None


def require(x: Tensor) -> None:
    """Raise a ValueError naming what is missing for backend='fla' on tensors like x."""
    if x.device.type != "cuda":
        raise ValueError(f"backend='fla' needs CUDA tensors, got {x.device}; use 'auto' or 'chunked'")
    err = _import_error()
    if err is not None:
        raise ValueError(f"backend='fla' needs flash-linear-attention: {INSTALL} ({err})")


def _common(*xs: Tensor) -> tuple[Tensor, ...]:
    """xs in their shared dtype when it is bf16, fp16 or fp32, else all in fp32."""
    dt = xs[0].dtype
    if dt not in (torch.bfloat16, torch.float16, torch.float32) or any(x.dtype != dt for x in xs):
        dt = torch.float32
    return tuple(x.to(dt) for x in xs)


def wkv6_fla(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """Same contract as ``wkv6_naive`` (r, k, v, w [B, T, H, N], u [H, N], s0 [B, H, N(key), N(value)]),
    on fla's ``chunk_rwkv6``. Returns y [B, T, H, N] fp32 and the final state fp32."""
    from fla.ops.rwkv6 import chunk_rwkv6

    r, k, v, w, u = _common(r, k, v, w, u)
    y, sT = chunk_rwkv6(
        r, k, v, w, u, scale=1.0, initial_state=s0.to(torch.float32).contiguous(), output_final_state=True
    )
    return y.to(torch.float32), sT.to(torch.float32)


def wkv7_fla(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor
) -> tuple[Tensor, Tensor]:
    """Same contract as ``wkv7_naive`` (all [B, T, H, N], s0 [B, H, N(value), N(key)]), on fla's
    ``chunk_rwkv7``. Returns y [B, T, H, N] fp32 and the final state fp32 [value, key]."""
    from fla.ops.rwkv7 import chunk_rwkv7

    r, k, v, a, b = _common(r, k, v, a, b)
    w = w.to(torch.float32)
    h0 = s0.to(torch.float32).transpose(-1, -2).contiguous()  # fla: [B, H, K, V]
    with warnings.catch_warnings():
        # fla warns on every fp32 call of its delta-rule kernels ("does not support float32 on some
        # platforms"); fp32 is the dtype the GPU test checks against the naive form
        warnings.filterwarnings("ignore", message=".*does not support float32", category=RuntimeWarning)
        y, sT = chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=h0, output_final_state=True)
    return y.to(torch.float32), sT.to(torch.float32).transpose(-1, -2)
