"""The Eagle/Finch (RWKV-5/6) WKV recurrence: one public op, a naive and a chunked backend.

Per batch row and head, with a matrix state S [N(key), N(value)]:

    y_t = r_t @ (S_{t-1} + diag(u) k_t^T v_t)
    S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t

``w`` is the LOG decay (w <= 0; Finch passes w = -exp(time_decay + lora(x))). Eagle (v5) is the
same op with a time-constant decay (see ``wkv5``).

Backends (chosen by argument, all differentiable by autograd, all computing in fp32):

- ``naive``: the per-step loop above. It is the source of truth; tests chain it to the reference.
- ``chunked``: the parallel form. Tokens are cut into chunks of ``chunk_size`` (a multiple of 16);
  chunks talk to each other only through the state (a short loop over chunks). Inside a chunk the
  attention matrix A [L, L] is built, then y = A @ v + (queries @ entering state). A chunk whose
  cumulative decay stays above -FLAT_SPAN in every channel (every chunk at typical decays) gets A
  from one matmul of chunk-relative factors; any other chunk gets it hierarchically, exact for any
  decay: sub-blocks of 16 inside the chunk, of 4 inside each 16, single pairs inside each 4.
- ``native``: the C kernel of ``rwkvkit.ops.native`` (CPU, inference: no gradient).
- ``fla``: flash-linear-attention's ``chunk_rwkv6`` Triton kernel (``rwkvkit.ops.fla_kernels``:
  CUDA, the optional ``fla`` extra; differentiable).
- ``auto``: ``native`` for CPU inference when built; ``fla`` on CUDA for more than one token when
  installed; else ``naive`` for a single token (decoding), ``chunked`` otherwise. ``recurrent`` is an
  alias of ``naive``.

Stability of the chunked form, without clamping w. The weight of key s in query t is
exp(e(t, s)) with e(t, s) = sum_{s < m < t} w_m <= 0. A matmul needs it factorised as
exp(a_t) * exp(b_s). We split every pair at a reference point ref that lies between them: query t
in sub-block I, key s in an earlier sub-block J < I, ref = the last token of sub-block I-1, so
s <= ref <= t - 1 and

    a_t = sum_{ref < m < t} w_m <= 0,    b_s = sum_{s < m <= ref} w_m <= 0.

Both factors are <= 1, whatever the decays: nothing overflows, and a factor that underflows to 0
belongs to a pair whose true weight is below it too. Pairs inside one sub-block go to the next level
down, so no factor ever spans more than one chunk. (The one-matmul form factorises at the chunk
start instead: exp(c_{t-1}) * exp(-c_s) with c the cumulative decay from there, used only when
c >= -FLAT_SPAN over the whole chunk, so both factors stay within exp(+-FLAT_SPAN).)

Every exponent is computed as a sum of same-sign terms (cumsums restarted at each sub-block, never
a difference of two cumsums), so it carries relative error ~1e-7 even when the cumulative decay
reaches -1e4 inside a chunk. In hierarchical chunks, decay factors below exp(-40) are flushed to 0:
such pairs weigh < 4e-18 of r.k v, and fp32 denormals would otherwise make the matmuls several
times slower.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import fla_kernels, native

Tensor = torch.Tensor

BACKENDS = ("naive", "chunked", "auto", "recurrent", "native", "fla")

# Chunks whose cumulative decay stays above -FLAT_SPAN (all of them at typical decays) use the one-matmul
# form; the others the hierarchical one, whose decay factors below TINY = exp(-FLAT_SPAN) are flushed to 0.
# exp(40) ~ 2e17 keeps r * k * factor far from overflow; TINY ~ 4e-18 keeps products of factors normal.
FLAT_SPAN = 40.0
TINY = math.exp(-FLAT_SPAN)


def wkv6(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    *,
    backend: str = "chunked",
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Finch WKV over a sequence.

    Args:
        r, k, v: [B, T, H, N], any float dtype (computed in fp32).
        w: log decay [B, T, H, N], w <= 0 (decay factor exp(w)).
        u: bonus (``time_faaaa``) [H, N].
        state: [B, H, N, N] fp32 laid out [key, value], or None for zeros. Not modified.
        backend: "chunked" (default), "naive", "recurrent" (= naive), "native" (the C kernel of
            ``rwkvkit.ops.native``: CPU, no gradient), "fla" (flash-linear-attention on CUDA) or
            "auto" (native where it applies, fla on CUDA for T > 1 when installed, else naive when
            T == 1 and chunked otherwise).
        chunk_size: tokens per chunk of the chunked form, a positive multiple of 16.

    Returns:
        y [B, T, H, N] fp32 and the final state [B, H, N, N] fp32 (fp64 when r, k, v, w, u are all fp64).
    """
    B, T, H, N = check_inputs(r, k, v, w, u, state, w_per_token=True)
    return _dispatch(r, k, v, w, u, state, backend, chunk_size, B, T, H, N)


def check_inputs(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor | None, w_per_token: bool
) -> tuple[int, int, int, int]:
    """Validate shapes, dtypes and devices; return (B, T, H, N). Raises ValueError naming the argument.
    w is [B, T, H, N] when ``w_per_token`` (Finch), else [H, N] (Eagle)."""
    for name, x in (("r", r), ("k", k), ("v", v), ("w", w), ("u", u)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if r.dim() != 4:
        raise ValueError(f"r must be [B, T, H, N], got shape {tuple(r.shape)}")
    B, T, H, N = r.shape
    for name, x in (("k", k), ("v", v)):
        if x.shape != r.shape:
            raise ValueError(f"{name} must have the shape of r {tuple(r.shape)}, got {tuple(x.shape)}")
    w_shape = (B, T, H, N) if w_per_token else (H, N)
    if tuple(w.shape) != w_shape:
        what = "[B, T, H, N]" if w_per_token else "[H, N]"
        raise ValueError(f"w must have shape {what} = {w_shape}, got {tuple(w.shape)}")
    if tuple(u.shape) != (H, N):
        raise ValueError(f"u must have shape [H, N] = {(H, N)}, got {tuple(u.shape)}")
    if state is not None:
        if not isinstance(state, torch.Tensor) or not state.is_floating_point():
            raise ValueError("state must be a floating-point torch.Tensor [B, H, N, N] or None")
        if tuple(state.shape) != (B, H, N, N):
            raise ValueError(f"state must have shape [B, H, N, N] = {(B, H, N, N)}, got {tuple(state.shape)}")
    for name, x in (("k", k), ("v", v), ("w", w), ("u", u), ("state", state)):
        if x is not None and x.device != r.device:
            raise ValueError(f"{name} is on {x.device} but r is on {r.device}")
    return B, T, H, N


def _dispatch(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    w: Tensor,
    u: Tensor,
    state: Tensor | None,
    backend: str,
    chunk_size: int,
    B: int,
    T: int,
    H: int,
    N: int,
) -> tuple[Tensor, Tensor]:
    """Shared tail of wkv5/wkv6: pick the backend and run it on fp32 copies. w is [B, T, H, N] here."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 16:
        raise ValueError(f"chunk_size must be a positive multiple of 16, got {chunk_size!r}")
    # fp32 compute for every dtype, except that all-fp64 inputs stay fp64 (for gradcheck).
    dt = torch.float64 if all(x.dtype == torch.float64 for x in (r, k, v, w, u)) else torch.float32
    s0 = r.new_zeros((B, H, N, N), dtype=dt) if state is None else state.to(dt)
    if backend == "native" and not native.usable(r, k, v, w, u, state):
        raise ValueError(
            "backend='native' needs the built CPU kernel, CPU tensors and no gradient "
            f"(built: {native.available()}); use 'auto' to fall back to the PyTorch forms"
        )
    if backend == "fla":
        fla_kernels.require(r)
    if backend == "auto":
        if dt == torch.float32 and T > 0 and native.usable(r, k, v, w, u, state):
            backend = "native"  # the exact serial recurrence in C: fastest for inference on CPU
        elif r.device.type == "cuda" and T > 1 and fla_kernels.available():
            backend = "fla"  # fla's chunked Triton kernels, forward and backward
        else:
            backend = "naive" if T == 1 else "chunked"
    if backend == "native" and T > 0:
        return native.wkv6_native(r, k, v, w, u, s0)
    if backend == "fla" and T > 0:
        return fla_kernels.wkv6_fla(r, k, v, w, u, s0)
    r, k, v, w, u = (x.to(dt) for x in (r, k, v, w, u))
    if T == 0:
        return r.new_zeros((B, 0, H, N)), s0.clone()
    if backend in ("naive", "recurrent"):
        return wkv6_naive(r, k, v, w, u, s0)
    return _wkv6_chunked(r, k, v, w, u, s0, chunk_size)


def wkv6_naive(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """The per-step fp32 loop (no checks; use ``wkv6(..., backend="naive")``). Shapes as in wkv6."""
    T = r.shape[1]
    S = s0
    decay = torch.exp(w)
    ys = []
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, N, N]
        ys.append(torch.einsum("bhi,bhij->bhj", r[:, t], S + u[:, :, None] * kv))
        S = decay[:, t, :, :, None] * S + kv
    return torch.stack(ys, dim=1), S


def _block_sums(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [G, P, N] -> (exclusive prefix sums, exclusive suffix sums, totals [G, N]) along P.

    Running sums of same-sign terms, never a difference of two cumsums (no cancellation)."""
    P = x.shape[1]
    pre, suf = [torch.zeros_like(x[:, 0])], [torch.zeros_like(x[:, 0])]
    for j in range(1, P):
        pre.append(pre[-1] + x[:, j - 1])
        suf.append(suf[-1] + x[:, P - j])
    return torch.stack(pre, 1), torch.stack(suf[::-1], 1), pre[-1] + x[:, P - 1]


_PAIR_MASKS: dict[tuple[int, str, torch.dtype], tuple[Tensor, Tensor]] = {}


def _pair_masks(P: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """For query sub-blocks I = 1..P-1 and key sub-blocks J = 0..P-2: between[J', (I, J)] = 1 where
    J < J' < I (the whole sub-blocks between key and reference), and neg[I, J] = -inf where J >= I."""
    key = (P, str(device), dtype)
    if key not in _PAIR_MASKS:
        i = torch.arange(1, P).view(1, P - 1, 1)
        j = torch.arange(0, P - 1).view(1, 1, P - 1)
        jp = torch.arange(P).view(P, 1, 1)
        between = ((j < jp) & (jp < i)).to(dtype).reshape(P, (P - 1) * (P - 1))
        neg = torch.zeros(P - 1, P - 1, dtype=dtype).masked_fill(j[0] >= i[0], float("-inf"))
        _PAIR_MASKS[key] = (between.to(device), neg.to(device))
    return _PAIR_MASKS[key]


def _earlier_blocks(A: Tensor, q: Tensor, kb: Tensor, tot: Tensor) -> None:
    """Add to the attention matrix A the weights of keys in EARLIER sub-blocks (in place).

    A: [G, P*l, P*l] (row t, column s); q, kb: [G, P, l, N] (G parent blocks of P sub-blocks of l
    tokens); tot: [G, P, N] the sum of w over each sub-block. q = r * exp(a), kb = k * exp(b) with
    a, b the in-sub-block sums of the module docstring; the sub-blocks strictly between key and
    reference add exp(D), D <= 0. Only rows of sub-blocks 1.. and columns of sub-blocks ..P-2 change.
    """
    G, P, l, N = q.shape
    between, neg = _pair_masks(P, q.device, q.dtype)
    D = (tot.transpose(1, 2) @ between).view(G, N, P - 1, P - 1).permute(0, 2, 3, 1) + neg[..., None]
    kk = kb[:, None, :-1] * F.threshold(torch.exp(D), TINY, 0.0)[:, :, :, None, :]  # [G, I, J, l, N]
    att = q[:, 1:] @ kk.reshape(G, P - 1, (P - 1) * l, N).transpose(-1, -2)  # [G, I, l, J*l]
    A[:, l:, : (P - 1) * l] += att.view(G, (P - 1) * l, (P - 1) * l)


def _flush(x: Tensor, flush: bool) -> Tensor:
    """Decay factors below exp(-FLAT_SPAN) set to 0, so that products of factors never reach fp32
    denormals (which make CPU matmuls several times slower). The pairs dropped weigh < 4e-18."""
    return F.threshold(x, TINY, 0.0) if flush else x


def _factors(r: Tensor, k: Tensor, w: Tensor, flush: bool) -> tuple[Tensor, ...]:
    """Query/key factors of G chunks (r, k, w: [G, L, N]), relative to the start/end of their 4-block,
    16-block and chunk, all <= 1: (q4, k4 [G*L/4, 4, N], q16, k16 [G*L/16, 4, 4, N], sums of w over
    4-blocks [G*L/4, N] and 16-blocks [G*L/16, N], qc, kc [G, L, N], chunk total [G, N])."""
    G, L, N = r.shape
    P, G4, G16 = L // 16, G * L // 4, G * L // 16
    xa4, xb4, t4 = _block_sums(w.reshape(G4, 4, N))  # inside 4-blocks: [G4, 4, N] x2, [G4, N]
    xa16, xb16, t16 = _block_sums(t4.view(G16, 4, N))  # over 4-blocks inside 16-blocks
    xac, xbc, tc = _block_sums(t16.view(G, P, N))  # over 16-blocks inside chunks
    out = []
    for x, e4, e16, ec in ((r, xa4, xa16, xac), (k, xb4, xb16, xbc)):
        f4 = _flush(torch.exp(e4), flush)  # [G4, 4, N]
        f16 = _flush(f4.view(G16, 4, 4, N) * torch.exp(e16)[:, :, None], flush)
        fc = _flush(f16.view(G, P, 16, N) * torch.exp(ec)[:, :, None], flush)
        out.append((x.reshape(G4, 4, N) * f4, x.reshape(G16, 4, 4, N) * f16, x * fc.view(G, L, N)))
    (q4, q16, qc), (k4, k16, kc) = out
    return q4, k4, q16, k16, t4, t16, qc, kc, tc


def _hier_attention(r: Tensor, k: Tensor, w: Tensor, ru: Tensor, fac: tuple[Tensor, ...]) -> Tensor:
    """The chunk's own attention matrix A [G, L, L] (y_intra = A @ v; row t, column s <= t, the
    bonus term r_t . (u * k_t) = ru [G, L] on the diagonal), exact for any decays: pairs inside a
    4-block one by one, then earlier 4-blocks of each 16-block, then earlier 16-blocks."""
    G, L, N = r.shape
    P, G4, G16 = L // 16, G * L // 4, G * L // 16
    q4, k4, q16, k16, t4, t16 = fac[:6]
    r4, k4_, w4 = (x.reshape(G4, 4, N) for x in (r, k, w))
    # Inside a 4-block: distance 1 has no decay between, 2 has exp(w_{t-1}), 3 exp(w_{t-1} + w_{t-2}).
    dw = F.threshold(torch.exp(w4[:, 1:3]), TINY, 0.0)  # [G4, 2, N]
    band = (
        ru.view(G4, 4),
        (r4[:, 1:] * k4_[:, :3]).sum(-1),
        (r4[:, 2:] * k4_[:, :2] * dw).sum(-1),
        (r4[:, 3] * k4_[:, 0] * dw[:, 0] * dw[:, 1]).sum(-1, keepdim=True),
    )
    A16 = r.new_zeros(G16, 4, 4, 4, 4)  # [16-block, 4-block I, t, 4-block J, s]
    A4 = torch.diagonal(A16, 0, 1, 3)  # the 4-blocks on the diagonal: [G16, t, s, I]
    for d, vals in enumerate(band):
        torch.diagonal(A4, -d, 1, 2).copy_(vals.view(G16, 4, 4 - d))  # [G16, I, t - d]
    A16 = A16.view(G16, 16, 16)
    _earlier_blocks(A16, q4.view(G16, 4, 4, N), k4.view(G16, 4, 4, N), t4.view(G16, 4, N))
    A = r.new_zeros(G, P, 16, P, 16)
    torch.diagonal(A, 0, 1, 3).copy_(A16.view(G, P, 16, 16).permute(0, 2, 3, 1))
    A = A.view(G, L, L)
    if P > 1:
        _earlier_blocks(A, q16.view(G, P, 16, N), k16.view(G, P, 16, N), t16.view(G, P, N))
    return A


def _flat_attention(qc: Tensor, kc: Tensor, tc: Tensor, ru: Tensor) -> Tensor:
    """The same A in one matmul, for chunks whose total decay is >= -FLAT_SPAN in every channel:
    exp(c_{t-1} - c_s) = exp(c_{t-1}) * exp(-c_s) with c the cumulative decay from the chunk start,
    and exp(-c_s) = exp(suffix_s) * exp(-total) <= exp(FLAT_SPAN): no overflow, no underflow."""
    A = (qc @ (kc * torch.exp(-tc)[:, None]).transpose(-1, -2)).tril(-1)
    return A + torch.diag_embed(ru)


def _rows(x: Tensor, idx: Tensor, G: int) -> Tensor:
    """Rows idx of a tensor whose leading dimension is G chunk rows, possibly split further."""
    return x.reshape(G, -1)[idx].reshape(-1, *x.shape[1:])


def _chunk_attention(r: Tensor, k: Tensor, w: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For G chunks (r, k, w: [G, L, N], u: [G, N] each row's bonus): the attention matrix A [G, L, L],
    the chunk-relative factors qc, kc [G, L, N] and the chunk's total log decay [G, N]."""
    G = r.shape[0]
    flat = w.sum(1).amin(-1) >= -FLAT_SPAN  # [G]: chunk rows the one-matmul form can take
    all_flat = bool(flat.all())
    fac = _factors(r, k, w, flush=not all_flat)  # flushing changes nothing in flat rows
    qc, kc, tc = fac[6:]
    ru = ((r * k) @ u[:, :, None]).squeeze(-1)  # [G, L]: r_t . (u * k_t)
    if all_flat:
        return _flat_attention(qc, kc, tc, ru), qc, kc, tc
    if not bool(flat.any()):
        return _hier_attention(r, k, w, ru, fac), qc, kc, tc
    i_f, i_h = flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1)
    A = r.new_zeros(G, r.shape[1], r.shape[1])
    A = A.index_put((i_f,), _flat_attention(qc[i_f], kc[i_f], tc[i_f], ru[i_f]))
    sub = [_rows(x, i_h, G) for x in (r, k, w, ru, *fac[:6])]
    return A.index_put((i_h,), _hier_attention(*sub[:4], tuple(sub[4:]))), qc, kc, tc


def _to_rows(x: Tensor, pad: int, rows: int, L: int) -> Tensor:
    """[B, T, H, N] -> [B*H*nc, L, N] with `pad` zero tokens at the end, in one copy."""
    x = x.transpose(1, 2)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(rows, L, x.shape[-1])


def _wkv6_chunked(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, s0: Tensor, L: int
) -> tuple[Tensor, Tensor]:
    B, T, H, N = r.shape
    L = min(L, -(-T // 16) * 16)  # no point in a chunk longer than the padded sequence
    nc = -(-T // L)
    pad, rows = nc * L - T, B * H * nc
    # [B*H*nc, L, N]: one row per chunk of one head. Padding tokens have r = k = v = 0 and w = 0:
    # they change neither y nor the state.
    r, k, v, w = (_to_rows(x, pad, rows, L) for x in (r, k, v, w))
    uu = u.repeat(B, 1).repeat_interleave(nc, 0)  # [rows, N]

    A, qc, kc, tc = _chunk_attention(r, k, w, uu)
    upd = (kc.transpose(-1, -2) @ v).view(B * H, nc, N, N)  # what each chunk adds to the state

    # Across chunks: the state entering each chunk (a short loop over chunks), then one matmul.
    dec = F.threshold(torch.exp(tc), TINY, 0.0).view(B * H, nc, N, 1)
    S = s0.reshape(B * H, N, N)
    starts = []
    # unbind, not dec[:, c]: the backward of each indexing writes into a zeroed gradient of the whole
    # tensor, nc of them (quadratic in T: fwd+bwd 0.8 s at 8k tokens, 8 s at 16k); unbind's is one stack
    for d_c, u_c in zip(dec.unbind(1), upd.unbind(1)):
        starts.append(S)
        S = d_c * S + u_c
    y = torch.baddbmm(A @ v, qc, torch.stack(starts, 1).view(rows, N, N))
    y = y.view(B, H, nc * L, N)[:, :, :T].transpose(1, 2)
    return y, S.reshape(B, H, N, N)
