"""The chunked parallel form of the RWKV-7 WKV (``wkv7(..., backend="chunked")``), in plain PyTorch.

Inside the op the state is handled as X = S^T [N(key), N(value)] (fla's and Finch's layout), where
one step reads X_t = P_t X_{t-1} + k_t^T v_t with the diagonal-plus-low-rank transition
P_t = D_t + b_t^T a_t, D_t = diag(exp(w_t)), and y_t = r_t X_t.

The low-rank part is a second write: X_t = D_t X_{t-1} + k_t^T v_t + b_t^T u_t with the "pseudo
value" u_t = a_t X_{t-1}. Inside a chunk of L tokens entering with state X_0, with gamma(s, t) the
product of the decays D_m for s < m <= t (a diagonal, <= 1),

    u_t = a_t gamma(0, t-1) X_0 + sum_{s<t} [a_t gamma(s, t-1) k_s^T] v_s + [a_t gamma(s, t-1) b_s^T] u_s
    y_t = r_t gamma(0, t) X_0   + sum_{s<=t} [r_t gamma(s, t) k_s^T] v_s + [r_t gamma(s, t) b_s^T] u_s
    X_L = gamma(0, L) X_0       + sum_s gamma(s, L) (k_s^T v_s + b_s^T u_s)

The bracketed pair weights form four L x L matrices A_ak, A_ab (strictly lower), A_rk, A_rb (lower).
The first line is a unit lower-triangular system, (I - A_ab) u = a~ X_0 + A_ak v, solved once per
chunk for both right-hand sides (the WY representation: u = W X_0 + U, W and U independent of
X_0). Then each chunk's whole effect on the state is one affine map X_L = M X_0 + Delta with
M = gamma(0, L) + b^_T W, Delta = k^_T v + b^_T U (b^, k^ the keys decayed to the chunk's end), so
the only serial work is one N x N x N matmul per chunk; every other product is batched over all
chunks, heads and batch rows at once.

Stability without clamping w. The pair weights gamma(s, t-1) are exp(c_{t-1} - c_s) per channel,
with c the cumulative log decay inside the chunk. When a chunk's total decay stays above -FLAT_SPAN
in every channel (always, at RWKV-7's decays: >= -0.6066 per token, so >= -38.9 over 64 tokens),
they are factorised at the chunk start: exp(c_{t-1}) <= 1 on the query side, exp(-c_s) <=
exp(FLAT_SPAN) on the key side, in one matmul, with no overflow. Any other chunk takes Finch's
hierarchical form (``rwkvkit.ops.wkv6._chunk_attention``: exact for any decay, every factor <= 1)
for the same four matrices. Since the factors that reach the state (exp(c_t), exp(c_L - c_s)) are
<= 1 and the triangular solve is the recurrence itself, nothing grows that the recurrence does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .wkv6 import FLAT_SPAN, _chunk_attention

Tensor = torch.Tensor


def _to_rows(x: Tensor, pad: int, rows: int, L: int) -> Tensor:
    """[B, T, H, N] -> [B*H*nc, L, N] with `pad` zero tokens at the end."""
    x = x.transpose(1, 2)
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(rows, L, x.shape[-1])


def _flat_pairs(r: Tensor, w: Tensor, k: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    """Chunks whose total decay is >= -FLAT_SPAN in every channel, factorised at the chunk start.
    Returns (A_a = [A_ak | A_ab], A_r = [A_rk | A_rb] [G, L, 2L], a~ = a exp(c_{t-1}), r~ = r exp(c_t),
    kb^ = [k^; b^] = [k; b] exp(c_L - c_t) [G, 2L, N], total log decay c_L [G, N])."""
    L = r.shape[1]
    c = torch.cumsum(w, 1)  # [G, L, N], inclusive, same-sign terms
    tot = c[:, -1]
    at, rt = a * torch.exp(c - w), r * torch.exp(c)
    keys = torch.cat((k, b), 1) * torch.exp(-c).repeat(1, 2, 1)  # [G, 2L, N], factors <= exp(FLAT_SPAN)
    mask = torch.ones(L, L, dtype=torch.bool, device=r.device)
    # a-queries see keys s < t, r-queries s <= t
    A_a = (at @ keys.transpose(1, 2)) * mask.tril(-1).repeat(1, 2).to(r.dtype)
    A_r = (rt @ keys.transpose(1, 2)) * mask.tril(0).repeat(1, 2).to(r.dtype)
    to_end = torch.exp(tot[:, None] - c).repeat(1, 2, 1)  # <= 1
    return A_a, A_r, at, rt, torch.cat((k, b), 1) * to_end, tot


def _hier_pairs(r: Tensor, w: Tensor, k: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, ...]:
    """The same results, exact for any decay: Finch's attention builder (pair weights
    r_t . gamma(s, t-1) k_s, every factor <= 1) on four stacked copies of the chunks, queries
    (a, a, r exp(w), r exp(w)) against keys (k, b, k, b), and the diagonals r.k, r.b added."""
    G, L, N = r.shape
    rd = r * torch.exp(w)  # r_t gamma(s, t) = (r_t D_t) gamma(s, t-1)
    A4, qc, kc, tc = _chunk_attention(
        torch.cat((a, a, rd, rd)), torch.cat((k, b, k, b)), w.repeat(4, 1, 1), r.new_zeros(4 * G, N)
    )
    A_ak, A_ab, A_rk, A_rb = A4.view(4, G, L, L).unbind(0)
    A_rk = A_rk + torch.diag_embed((r * k).sum(-1))
    A_rb = A_rb + torch.diag_embed((r * b).sum(-1))
    qa, _, qr, _ = qc.view(4, G, L, N).unbind(0)
    kh, bh, _, _ = kc.view(4, G, L, N).unbind(0)
    return torch.cat((A_ak, A_ab), 2), torch.cat((A_rk, A_rb), 2), qa, qr, torch.cat((kh, bh), 1), tc[:G]


def wkv7_chunked(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s0: Tensor, L: int
) -> tuple[Tensor, Tensor]:
    """The chunked form (no checks, no casts; use ``wkv7(..., backend="chunked")``): inputs as in
    ``wkv7`` in one float dtype, s0 [B, H, N(value), N(key)], L a multiple of 16. Returns (y, final
    state [value, key])."""
    B, T, H, N = r.shape
    L = min(L, -(-T // 16) * 16)  # no point in a chunk longer than the padded sequence
    nc = -(-T // L)
    pad, rows = nc * L - T, B * H * nc
    # [B*H*nc, L, N]: one row per chunk of one head. Padding tokens have r = k = v = a = b = 0 and
    # w = 0: an identity transition that writes nothing.
    r, w, k, v, a, b = (_to_rows(x, pad, rows, L) for x in (r, w, k, v, a, b))
    flat = bool((w.sum(1) >= -FLAT_SPAN).all())
    A_a, A_r, at, rt, kbh, tot = (_flat_pairs if flat else _hier_pairs)(r, w, k, a, b)
    # (split and unbind, not slicing: their backward is one concatenation, not a zero-filled copy each)
    A_ak, A_ab = A_a.split(L, 2)

    # WY: (I - A_ab) [W | U] = [a~ | A_ak v], then each chunk's affine map X_L = M X_0 + Delta.
    eye = torch.eye(L, dtype=A_a.dtype, device=A_a.device)
    WU = torch.linalg.solve_triangular(
        eye - A_ab, torch.cat((at, A_ak @ v), 2), upper=False, unitriangular=True
    )
    W, U = WU.split(N, 2)
    kh, bh = kbh.split(L, 1)
    M = torch.diag_embed(torch.exp(tot)) + bh.transpose(1, 2) @ W  # [rows, N, N]
    Delta = kbh.transpose(1, 2) @ torch.cat((v, U), 1)  # k^T v + b^T U

    # Across chunks: the state entering each chunk (the only serial loop), in the [key, value] layout.
    X = s0.reshape(B * H, N, N).transpose(1, 2)
    starts = []
    for Mc, Dc in zip(M.view(B * H, nc, N, N).unbind(1), Delta.view(B * H, nc, N, N).unbind(1)):
        starts.append(X)
        X = torch.baddbmm(Dc, Mc, X)
    X0 = torch.stack(starts, 1).view(rows, N, N)

    u = torch.baddbmm(U, W, X0)  # the pseudo values [rows, L, N]
    y = torch.baddbmm(A_r @ torch.cat((v, u), 1), rt, X0)
    y = y.view(B, H, nc * L, N)[:, :, :T].transpose(1, 2)
    return y, X.transpose(1, 2).reshape(B, H, N, N)
