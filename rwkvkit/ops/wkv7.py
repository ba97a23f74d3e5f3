"""The RWKV-7 "Goose" WKV recurrence (the generalised delta rule): one public op, backend by argument.

Per batch row and head, with a matrix state S [N(value), N(key)] (the reference's layout, the
transpose of Eagle/Finch's) and row vectors r_t, k_t, v_t, a_t, b_t [N]:

    S_t = S_{t-1} diag(exp(w_t)) + (S_{t-1} a_t^T) b_t + v_t^T k_t
    y_t = S_t r_t^T                       (the UPDATED state; no bonus term, unlike v5/v6)

The transition S -> S (diag(exp(w_t)) + a_t^T b_t) is diagonal-plus-low-rank. RWKV-7 passes
a = -kk, b = kk * a_coef (kk the L2-normalised key, a_coef in (0, 1)): a contractive delta-rule
step ("erase kk's old value at rate a_coef, then write k -> v"), and w = -exp(-0.5) * sigmoid(z),
so each step's decay factor lies in [0.545, 1).

Backends (chosen by argument; all compute in fp32, fp64 when every input is fp64):

- ``naive``: the per-step loop above (also ``wkv7_naive``, the same signature), the source of
  truth; differentiable.
- ``chunked``: the parallel form of ``rwkvkit.ops.wkv7_chunked`` (WY representation per chunk,
  stable for any w <= 0); differentiable by autograd.
- ``native``: the C kernel of ``rwkvkit.ops.wkv7_native`` (CPU, inference: no gradient).
- ``fla``: flash-linear-attention's Triton kernel (``rwkvkit.ops.fla``; CUDA, optional extra).
- ``auto``: ``native`` for CPU inference without gradient when it is built; ``fla`` on CUDA when
  it is installed; otherwise ``naive`` for a single token and ``chunked`` for longer inputs.
  ``describe_backend`` says which one ``auto`` takes for given inputs, and why.
"""

from __future__ import annotations

import torch

from . import fla_kernels as fla
from . import wkv7_native
from .wkv7_chunked import wkv7_chunked

Tensor = torch.Tensor

BACKENDS = ("naive", "chunked", "native", "fla", "auto")
DEFAULT_CHUNK = 64  # at the model's decays (>= -0.6066 per token) a 64-token chunk spans >= -38.9


def wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor | None = None,
    *,
    backend: str = "chunked",
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """RWKV-7 WKV over a sequence.

    Args:
        r, k, v, a, b: [B, T, H, N], any float dtype (computed in fp32).
        w: LOG decay [B, T, H, N], w <= 0 (the step's decay factor is exp(w); RWKV-7 passes
            w = -exp(-0.5) * sigmoid(z)).
        state: [B, H, N, N] laid out [value, key] (the reference's layout), or None for zeros.
            Not modified.
        backend: "chunked" (default), "naive", "native", "fla" or "auto" (see the module docstring).
        chunk_size: tokens per chunk of the chunked form, a positive multiple of 16 (ignored by
            the other backends).

    Returns:
        y [B, T, H, N] fp32 and the final state [B, H, N, N] fp32 [value, key] (fp64 when every
        input is fp64).
    """
    B, T, H, N = check_inputs(r, w, k, v, a, b, state)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size!r}")
    xs = (r, w, k, v, a, b)
    dt = torch.float64 if all(x.dtype == torch.float64 for x in xs) else torch.float32
    if backend == "auto":
        backend = describe_backend(r, w, k, v, a, b, state)[0]
    elif backend == "native" and not wkv7_native.usable(*xs, state):
        raise ValueError(
            "backend='native' needs the built CPU kernel, CPU tensors and no gradient "
            f"(built: {wkv7_native.available()}); use 'auto' to fall back to the PyTorch forms"
        )
    elif backend == "fla":
        fla.require(r)
    s0 = r.new_zeros((B, H, N, N), dtype=dt) if state is None else state.to(dt)
    if T == 0:
        return r.new_zeros((B, 0, H, N), dtype=dt), s0.clone()
    if backend == "native":
        return wkv7_native.wkv7_native(r, w, k, v, a, b, s0)
    if backend == "fla":
        return fla.wkv7_fla(r, w, k, v, a, b, s0)
    r, w, k, v, a, b = (x.to(dt) for x in xs)
    if backend == "naive":
        return _naive_loop(r, w, k, v, a, b, s0)
    return wkv7_chunked(r, w, k, v, a, b, s0, chunk_size)


def describe_backend(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[str, str]:
    """The backend ``auto`` picks for these inputs, and why: (name, reason)."""
    xs = (r, w, k, v, a, b, state)
    all64 = all(x.dtype == torch.float64 for x in xs[:6])
    if r.device.type == "cpu":
        if wkv7_native.usable(*xs) and not all64:
            return "native", "CPU tensors without gradient: the C kernel"
        if not wkv7_native.available():
            why = "C kernel not built"
        else:
            why = "fp64 inputs (the C kernel computes in fp32)" if all64 else "gradient wanted"
    elif r.device.type == "cuda":
        if fla.available() and r.shape[1] > 1:
            return "fla", "CUDA and flash-linear-attention installed"
        why = "one token" if fla.available() else f"flash-linear-attention not installed ({fla.INSTALL})"
    else:
        why = f"no fast kernel for device {r.device.type}"
    if r.shape[1] <= 1:
        return "naive", f"one token ({why})"
    return "chunked", why


def check_inputs(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None
) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; return (B, T, H, N). Raises ValueError naming the argument."""
    named = (("r", r), ("w", w), ("k", k), ("v", v), ("a", a), ("b", b))
    for name, x in named:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N], got shape {tuple(r.shape)}")
    B, T, H, N = r.shape
    for name, x in named[1:]:
        if x.shape != r.shape:
            raise ValueError(
                f"{name} must have the shape of r [B, T, H, N] = {tuple(r.shape)}, got {tuple(x.shape)}"
            )
    if state is not None:
        if not isinstance(state, torch.Tensor) or not state.is_floating_point():
            raise ValueError("state must be a floating-point torch.Tensor [B, H, N, N] or None")
        if tuple(state.shape) != (B, H, N, N):
            raise ValueError(f"state must have shape [B, H, N, N] = {(B, H, N, N)}, got {tuple(state.shape)}")
    for name, x in (*named[1:], ("state", state)):
        if x is not None and x.device != r.device:
            raise ValueError(f"{name} is on {x.device} but r is on {r.device}")
    return B, T, H, N


def wkv7_naive(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The per-step loop, the source of truth: ``wkv7(..., backend="naive")``. Arguments and results
    as in ``wkv7``."""
    return wkv7(r, w, k, v, a, b, state, backend="naive")


def _naive_loop(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor
) -> tuple[Tensor, Tensor]:
    """The loop itself on validated inputs of one float dtype, s0 [B, H, N(value), N(key)], T >= 1."""
    S = s0
    decay = torch.exp(w)
    ys = []
    for t in range(r.shape[1]):
        # element-wise products and sums, not matmuls: batched mat-vec products of this size are far
        # slower in torch's CPU bmm (and no more exact)
        sa = (S * a[:, t, :, None, :]).sum(-1)  # [B, H, N(value)]: S a^T
        S = (
            S * decay[:, t, :, None, :]
            + sa[..., :, None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )
        ys.append((S * r[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, dim=1), S
