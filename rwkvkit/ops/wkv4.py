"""The RWKV-4 WKV recurrence: one public op, a naive and a chunked backend.

Per channel, with w = -exp(time_decay) < 0 and u = time_first:

    wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (sum_{i<t} e^{(t-1-i)w + k_i} + e^{u+k_t})

The state (aa, bb, pp) holds numerator and denominator scaled by e^{-pp}, pp the running maximum
exponent (pp = -1e30 for an empty state), exactly as the reference (``rwkv`` package, ``att_seq``).

- ``naive``: the reference step, token by token, in fp32 (the source of truth).
- ``chunked``: blocks of ``chunk_size`` tokens, all blocks at once: the reference step runs along
  the positions of every block in parallel, and only block summaries (a, b, p) pass from block to
  block (a short loop), so exponents stay <= 0 after max-normalisation whatever k is. About
  2x the arithmetic of the naive loop in 2L + T/L steps instead of T: it wins at small batch
  (B=1, C=768, T=512: ~3x), the naive loop wins once B*C is large (B=8).
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
    chunk_size: int = 32,
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


def _step(
    w: Tensor, u: Tensor, kk: Tensor, vv: Tensor, aa: Tensor, bb: Tensor, pp: Tensor
) -> tuple[Tensor, ...]:
    """One reference step (rwkv package, ``att_seq``): the output for token (kk, vv), then the update."""
    ww = u + kk
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    y = (e1 * aa + e2 * vv) / (e1 * bb + e2)
    aa, bb, pp = _update(w, kk, vv, aa, bb, pp)
    return y, aa, bb, pp


def _update(
    w: Tensor, kk: Tensor, vv: Tensor, aa: Tensor, bb: Tensor, pp: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The state update of the reference step: decay by w, add e^k (v, 1), renormalise to the new max."""
    ww = w + pp
    p = torch.maximum(ww, kk)
    e1, e2 = torch.exp(ww - p), torch.exp(kk - p)
    return e1 * aa + e2 * vv, e1 * bb + e2, p


def wkv4_naive(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: State4) -> tuple[Tensor, State4]:
    """The reference step, token by token (no checks; use ``wkv4(..., backend="naive")``)."""
    aa, bb, pp = state
    ys = []
    for k_t, v_t in zip(k.unbind(1), v.unbind(1)):  # (unbind: one stack in backward, not T zeroed copies)
        y, aa, bb, pp = _step(w, u, k_t, v_t, aa, bb, pp)
        ys.append(y)
    return torch.stack(ys, dim=1), (aa, bb, pp)


def _wkv4_chunked(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: State4, L: int) -> tuple[Tensor, State4]:
    """Blocks of L tokens, all blocks at once: the reference step runs along the L positions of every
    block in parallel (a loop of L steps on [B, nb, C]), and only the block summaries go through a
    loop over blocks. Three passes:

    1. each block from the empty state -> its summary (a, b, p) at the block end;
    2. entering state of block j+1 = (entering state of j, decayed L steps) (+) summary of j, where (+)
       adds two max-normalised sums: p = max(p1, p2), a = a1 e^(p1-p) + a2 e^(p2-p);
    3. each block again from its entering state, now with outputs.
    Every exponent is <= 0 after max-normalisation, as in the reference step, whatever k is.
    """
    B, T, C = k.shape
    L = min(L, T)
    nb = -(-T // L)
    last = T - (nb - 1) * L  # real tokens in the last block
    pad = nb * L - T
    # Padding tokens come after the last real one: their outputs and updates are dropped.
    # unbound along the block positions (and the summaries along the blocks below): the backward of
    # x[:, :, t] writes into a zeroed gradient of all of x, one per index (quadratic in the loop length)
    kb = F.pad(k, (0, 0, 0, pad)).view(B, nb, L, C).unbind(2)
    vb = F.pad(v, (0, 0, 0, pad)).view(B, nb, L, C).unbind(2)

    aa, bb = k.new_zeros((B, nb, C)), k.new_zeros((B, nb, C))
    pp = k.new_full((B, nb, C), EMPTY_PP)
    for t in range(L):
        aa, bb, pp = _update(w, kb[t], vb[t], aa, bb, pp)

    a, b, p = state
    starts = [(a, b, p)]
    shift = L * w
    for aa_j, bb_j, pp_j in list(zip(aa.unbind(1), bb.unbind(1), pp.unbind(1)))[: nb - 1]:
        pd = p + shift
        pn = torch.maximum(pd, pp_j)
        e1, e2 = torch.exp(pd - pn), torch.exp(pp_j - pn)
        a, b, p = e1 * a + e2 * aa_j, e1 * b + e2 * bb_j, pn
        starts.append((a, b, p))
    aa, bb, pp = (torch.stack(x, 1) for x in zip(*starts))  # entering states [B, nb, C]

    ys = []
    for t in range(L):
        y, aa, bb, pp = _step(w, u, kb[t], vb[t], aa, bb, pp)
        ys.append(y)
        if t == last - 1:
            final = (aa[:, -1], bb[:, -1], pp[:, -1])
    y = torch.stack(ys, 2).view(B, nb * L, C)[:, :T]
    return y, final
