"""The RWKV-4 WKV recurrence: one public op, a naive and a chunked backend.

Per channel, with w = -exp(time_decay) < 0 and u = time_first:

    wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})

The state (aa, bb, pp) holds numerator and denominator scaled by e^{-pp}, pp the running maximum
exponent (pp = -1e30 for an empty state), exactly as the reference (``rwkv`` package, ``att_seq``).

- ``naive``: the reference step, token by token, in fp32 (the source of truth).
- ``chunked``: blocks of ``chunk_size`` tokens. Inside a block every pair (t, i) is formed
  explicitly in log space and normalised by the row maximum, so no exponent is positive whatever
  k is; the state passes from block to block in the same (a, b, p) form (a short loop over blocks).
- ``auto``: ``naive`` for one token, else ``chunked``; ``recurrent`` is an alias of ``naive``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
State4 = tuple[Tensor, Tensor, Tensor]

BACKENDS = ("naive", "chunked", "auto", "recurrent")
EMPTY_PP = -1e30


def wkv4(
    w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    state: State4 | None = None,
    *,
    backend: str = "chunked",
    chunk_size: int = 16,
) -> tuple[Tensor, State4]:
    """RWKV-4 WKV over a sequence.

    Args:
        w: decay, -exp(time_decay), [C], < 0.
        u: bonus (``time_first``) [C].
        k, v: [B, T, C], any float dtype (computed in fp32).
        state: (aa, bb, pp), each [B, C] fp32, or None for the empty state (0, 0, -1e30). Not modified.
        backend: "chunked" (default), "naive", "auto" (naive when T == 1) or "recurrent" (= naive).
        chunk_size: tokens per block of the chunked form, >= 1.

    Returns:
        y [B, T, C] fp32 and the new state (aa, bb, pp). All fp64 when w, u, k, v are all fp64.
    """
    B, T, C = _check(w, u, k, v, state)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dt = torch.float64 if all(x.dtype == torch.float64 for x in (w, u, k, v)) else torch.float32
    w, u, k, v = (x.to(dt) for x in (w, u, k, v))
    if state is None:
        aa, bb = k.new_zeros((B, C)), k.new_zeros((B, C))
        pp = k.new_full((B, C), EMPTY_PP)
    else:
        aa, bb, pp = (x.to(dt) for x in state)
    if T == 0:
        return k.new_zeros((B, 0, C)), (aa.clone(), bb.clone(), pp.clone())
    if backend == "auto":
        backend = "naive" if T == 1 else "chunked"
    if backend in ("naive", "recurrent"):
        return wkv4_naive(w, u, k, v, (aa, bb, pp))
    return _wkv4_chunked(w, u, k, v, (aa, bb, pp), chunk_size)


def _check(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: State4 | None) -> tuple[int, int, int]:
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}"
            )
    if k.dim() != 3:
        raise ValueError(f"k must be [B, T, C], got shape {tuple(k.shape)}")
    B, T, C = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, x in (("w", w), ("u", u)):
        if tuple(x.shape) != (C,):
            raise ValueError(f"{name} must have shape [C] = {(C,)}, got {tuple(x.shape)}")
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise ValueError("state must be a tuple (aa, bb, pp) of [B, C] tensors, or None")
        for name, x in zip(("aa", "bb", "pp"), state):
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != (B, C):
                raise ValueError(
                    f"state {name} must have shape [B, C] = {(B, C)}, got {getattr(x, 'shape', x)}"
                )
    for name, x in (("w", w), ("u", u), ("v", v)):
        if x.device != k.device:
            raise ValueError(f"{name} is on {x.device} but k is on {k.device}")
    return B, T, C


def wkv4_naive(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: State4) -> tuple[Tensor, State4]:
    """The reference step, token by token (no checks; use ``wkv4(..., backend="naive")``)."""
    aa, bb, pp = state
    ys = []
    for t in range(k.shape[1]):
        kk, vv = k[:, t], v[:, t]
        ww = u + kk
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vv) / (e1 * bb + e2))
        ww = w + pp
        p = torch.maximum(ww, kk)
        e1, e2 = torch.exp(ww - p), torch.exp(kk - p)
        aa, bb, pp = e1 * aa + e2 * vv, e1 * bb + e2, p
    return torch.stack(ys, dim=1), (aa, bb, pp)


def _wkv4_chunked(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: State4, L: int) -> tuple[Tensor, State4]:
    B, T, C = k.shape
    L = min(L, T)
    nb = -(-T // L)
    pad = nb * L - T
    # Padding keys are -inf (weight 0); the last block's state update uses its real length.
    kb = F.pad(k, (0, 0, 0, pad), value=float("-inf")).view(B, nb, L, C)
    vb = F.pad(v, (0, 0, 0, pad)).view(B, nb, L, C)
    tau = torch.arange(L, device=k.device)
    lens = torch.full((nb,), L, device=k.device)
    lens[-1] = L - pad

    # Inside each block: exponent of key i in query t is (t-1-i)w + k_i (i < t), u + k_t (i = t).
    dist = (tau[:, None] - 1 - tau[None, :]).to(k.dtype)  # [t, i]
    E = dist[..., None] * w + kb[:, :, None]  # [B, nb, t, i, C]
    E = torch.where((tau[:, None] > tau[None, :])[..., None], E, float("-inf"))
    E = torch.where(torch.eye(L, dtype=torch.bool, device=k.device)[..., None], (u + kb)[:, :, None], E)
    m = E.amax(3)  # [B, nb, t, C]; finite: a row holds its own token or earlier real ones
    P = torch.exp(E - m[:, :, :, None])
    num, den = (P * vb[:, :, None]).sum(3), P.sum(3)

    # What each block adds to the state at its end: exponent (len-1-i)w + k_i, max-normalised.
    Fx = (lens[:, None] - 1 - tau[None, :]).to(k.dtype)[..., None] * w + kb  # [B, nb, i, C]
    pm = Fx.amax(2)
    Px = torch.exp(Fx - pm[:, :, None])
    add_a, add_b = (Px * vb).sum(2), Px.sum(2)

    aa, bb, pp = state
    starts = []
    for j in range(nb):
        starts.append((aa, bb, pp))
        pd = pp + lens[j] * w
        p = torch.maximum(pd, pm[:, j])
        e1, e2 = torch.exp(pd - p), torch.exp(pm[:, j] - p)
        aa, bb, pp = e1 * aa + e2 * add_a[:, j], e1 * bb + e2 * add_b[:, j], p
    a0, b0, p0 = (torch.stack(x, 1)[:, :, None] for x in zip(*starts))  # [B, nb, 1, C]

    # Combine the entering state (exponent p0 + t w) with the in-block terms (exponent m).
    se = p0 + tau[:, None].to(k.dtype) * w
    M = torch.maximum(se, m)
    e1, e2 = torch.exp(se - M), torch.exp(m - M)
    y = (e1 * a0 + e2 * num) / (e1 * b0 + e2 * den)
    return y.reshape(B, nb * L, C)[:, :T], (aa, bb, pp)
