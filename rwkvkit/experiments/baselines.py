"""The paper's two non-RWKV baselines, in plain PyTorch: a softmax-attention transformer and Mamba.

- ``Transformer``: pre-LayerNorm GPT blocks (causal ``scaled_dot_product_attention`` with rotary
  positions, a GELU MLP of width 4d), tied to nothing, with an explicit preallocated KV cache
  (``KVCache``) for one-token decoding: the "same-size transformer with a KV cache" of the inference
  comparison and the attention baseline of MQAR.
- ``Mamba``: Mamba-1 blocks (in-projection, causal depthwise conv, selective scan, SiLU gate,
  out-projection) as in Gu & Dao (2023), one block per layer behind a pre-LayerNorm residual.
- ``selective_scan``: Mamba's selective scan with ``mamba_ssm.selective_scan_fn``'s signature.
  ``selective_scan_ref`` is the per-step loop (the truth); ``backend="loop"`` runs the same loop in
  segments of ``segment`` steps under activation checkpointing, so a long sequence keeps only the
  segment-boundary states for backward (memory O(T/segment) states instead of O(T)); ``"cuda"`` is
  the ``mamba-ssm`` kernel, used by ``"auto"`` only when the package imports and the inputs are on a
  GPU. Nothing here imports ``mamba_ssm`` unless that backend is asked for.

Every model takes tokens [B, T] (int64) and returns logits [B, T, V] float32, like ``rwkvkit``'s RWKV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor
SCAN_BACKENDS = ("auto", "loop", "ref", "cuda")


# ---- selective scan -----------------------------------------------------------------------------


def _scan_inputs(u: Tensor, delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    delta = delta.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    return F.softplus(delta) if softplus else delta


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The selective scan as a per-step fp32 loop (the truth; autograd through every step).

    u, delta, z: [B, Dc, T]; A: [Dc, N] (negative); B, C: [B, N, T]; D, delta_bias: [Dc].
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t (per channel d and state n);
    y_t = C_t . h_t + D u_t, times silu(z_t) when z is given. Returns y [B, Dc, T] in u's dtype.
    """
    dt = _scan_inputs(u, delta, delta_bias, delta_softplus)
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    dt, uf, Af, Bf, Cf = (x.to(f) for x in (dt, u, A, B, C))
    h = uf.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # [B, Dc, N]
    ys = []
    for t in range(u.shape[2]):
        dA = torch.exp(dt[:, :, t, None] * Af)
        h = dA * h + (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bf[:, None, :, t]
        ys.append((h * Cf[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    return _scan_out(y, uf, D, z).to(u.dtype)


def _scan_out(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


class _ScanLoop(torch.autograd.Function):
    """The scan's recurrence, y_t = C_t . h_t, one step at a time with a hand-written backward.

    Forward keeps only the state at the start of every ``segment`` steps; backward recomputes a
    segment's states from there and walks it in reverse. Memory: T/segment states plus one
    segment's, instead of autograd's several [B, Dc, N] tensors per step. Inputs time-major
    u, dt [T, B, Dc]; B, C [T, B, N]; A [Dc, N]; returns y [T, B, Dc].
    """

    @staticmethod
    def forward(ctx, u, dt, A, B, C, segment: int):  # type: ignore[override]
        with torch.autocast(u.device.type, enabled=False):  # the recurrence stays in u's dtype
            return _ScanLoop._forward(ctx, u, dt, A, B, C, segment)

    @staticmethod
    def _forward(ctx, u, dt, A, B, C, segment: int):
        h = u.new_zeros(u.shape[1], u.shape[2], A.shape[1])
        starts, ys = [], []
        for t in range(u.shape[0]):
            if t % segment == 0:
                starts.append(h)
            h = torch.addcmul(
                (dt[t] * u[t])[:, :, None] * B[t][:, None, :], torch.exp(dt[t][:, :, None] * A), h
            )
            ys.append(torch.bmm(h, C[t][:, :, None]).squeeze(-1))
        ctx.save_for_backward(u, dt, A, B, C, *starts)
        ctx.segment = segment
        return torch.stack(ys)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        u = ctx.saved_tensors[0]
        with torch.autocast(u.device.type, enabled=False):
            return _ScanLoop._backward(ctx, gy.to(u.dtype))

    @staticmethod
    def _backward(ctx, gy):
        u, dt, A, B, C, *starts = ctx.saved_tensors
        K, T = ctx.segment, u.shape[0]
        gu, gdt, gB, gC = (torch.empty_like(x) for x in (u, dt, B, C))
        gA = torch.zeros(u.shape[1], *A.shape, dtype=A.dtype, device=A.device)  # summed over batch at the end
        gh = torch.zeros_like(starts[0])
        for s in reversed(range(len(starts))):
            lo, hi = s * K, min(s * K + K, T)
            hs, h = [starts[s]], starts[s]  # the states entering each step of the segment, and its last
            for t in range(lo, hi):
                h = torch.addcmul(
                    (dt[t] * u[t])[:, :, None] * B[t][:, None, :], torch.exp(dt[t][:, :, None] * A), h
                )
                hs.append(h)
            for t in reversed(range(lo, hi)):
                h_t, h_prev = hs[t - lo + 1], hs[t - lo]
                gh = torch.addcmul(gh, gy[t][:, :, None], C[t][:, None, :])  # dL/dh_t
                gC[t] = torch.bmm(gy[t][:, None, :], h_t).squeeze(1)
                dA = torch.exp(dt[t][:, :, None] * A)
                g_dA = gh * h_prev * dA  # dL/d(dt_t A) through the decay
                g_dtu = torch.bmm(gh, B[t][:, :, None]).squeeze(-1)  # dL/d(dt_t u_t)
                gB[t] = torch.bmm((dt[t] * u[t])[:, None, :], gh).squeeze(1)
                gdt[t] = (g_dA * A).sum(-1) + g_dtu * u[t]
                gu[t] = g_dtu * dt[t]
                gA.addcmul_(g_dA, dt[t][:, :, None])
                gh = gh * dA  # on to h_{t-1}
        return gu, gdt, gA.sum(0), gB, gC, None


def _scan_loop(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, segment: int) -> Tensor:
    """u, dt [B, Dc, T], B, C [B, N, T] -> y [B, Dc, T] (the recurrence only; D and z are added outside)."""
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    ut, dtt = (x.to(f).permute(2, 0, 1).contiguous() for x in (u, dt))  # [T, B, Dc]
    Bt, Ct = (x.to(f).permute(2, 0, 1).contiguous() for x in (B, C))  # [T, B, N]
    return _ScanLoop.apply(ut, dtt, A.to(f), Bt, Ct, segment).permute(1, 2, 0)


def mamba_ssm_available() -> bool:
    """True when the ``mamba-ssm`` CUDA kernels import (they need a GPU build of the package)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception:  # ImportError, or a CUDA extension that fails to load
        return False
    return True


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: str = "auto",
    segment: int = 64,
) -> Tensor:
    """Mamba's selective scan (shapes as ``selective_scan_ref``); backend "auto" | "loop" | "ref" | "cuda".

    "auto" takes the ``mamba-ssm`` kernel for CUDA inputs when it imports, else "loop".
    """
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"backend must be one of {SCAN_BACKENDS}, got {backend!r}")
    if u.dim() != 3 or A.dim() != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"u must be [B, Dc, T] and A [Dc, N]; got {tuple(u.shape)} and {tuple(A.shape)}")
    if backend == "auto":
        backend = "cuda" if u.is_cuda and mamba_ssm_available() else "loop"
    if backend == "cuda":
        if not (u.is_cuda and mamba_ssm_available()):
            raise ValueError(
                "backend 'cuda' needs CUDA tensors and the mamba-ssm package (pip install mamba-ssm)"
            )
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dt = _scan_inputs(u, delta, delta_bias, delta_softplus)
    y = _scan_loop(u, dt, A, B, C, segment)
    return _scan_out(y, u.to(y.dtype), D, z).to(u.dtype)


# ---- Mamba --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MambaConfig:
    n_layer: int
    n_embd: int  # d_model
    vocab_size: int
    d_state: int = 16  # N
    d_conv: int = 4
    expand: int = 2  # d_inner = expand * d_model
    scan_backend: str = "auto"

    @property
    def d_inner(self) -> int:
        return self.expand * self.n_embd

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.n_embd / 16)


class MambaMixer(nn.Module):
    """One Mamba-1 block: x [B, T, d] -> [B, T, d]."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        d, di, n, r = cfg.n_embd, cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.cfg = cfg
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)
        with torch.no_grad():  # Mamba's dt init: dt log-uniform in [1e-3, 1e-1], bias = softplus^-1(dt)
            std = r**-0.5
            self.dt_proj.weight.uniform_(-std, std)
            dt = torch.exp(torch.rand(di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        n, r = self.cfg.d_state, self.cfg.dt_rank
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, di, T] each
        xs = F.silu(self.conv1d(xs)[..., :T])
        dt, Bm, Cm = self.x_proj(xs.transpose(1, 2)).split([r, n, n], dim=-1)  # [B, T, *]
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # [B, di, T]; bias goes in as delta_bias
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            xs, dt, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D, z, self.dt_proj.bias, True,
            backend=self.cfg.scan_backend,
        )  # fmt: skip
        return self.out_proj(y.transpose(1, 2).to(x.dtype))


class Mamba(nn.Module):
    """Embedding, ``n_layer`` pre-LayerNorm Mamba blocks, final LayerNorm, head: tokens -> logits."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.norms = nn.ModuleList([nn.LayerNorm(cfg.n_embd) for _ in range(cfg.n_layer)])
        self.mixers = nn.ModuleList([MambaMixer(cfg) for _ in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        nn.init.normal_(self.emb.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x))
        return self.head(self.ln_out(x)).float()


# ---- Transformer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerConfig:
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    ffn_mult: int = 4
    rope_base: float = 10000.0

    @property
    def n_head(self) -> int:
        return max(self.n_embd // self.head_size, 1)


def _rope(x: Tensor, pos: Tensor, base: float) -> Tensor:
    """Rotary positions on x [B, H, T, hs] at positions pos [T] (pairs (i, i + hs/2))."""
    half = x.shape[-1] // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.float()[:, None] * inv  # [T, half]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class KVCache:
    """Preallocated keys and values of every layer: k, v [L, B, H, capacity, hs]; ``length`` filled."""

    def __init__(
        self, cfg: TransformerConfig, batch: int, capacity: int, device=None, dtype=torch.float32
    ) -> None:
        shape = (cfg.n_layer, batch, cfg.n_head, capacity, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def nbytes(self, length: int | None = None) -> int:
        """Bytes the cache holds for ``length`` tokens (default: those filled)."""
        n = self.length if length is None else length
        per_token = 2 * self.k[:, :, :, 0].numel() * self.k.element_size()
        return per_token * n


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        H = self.cfg.n_head
        q, k, v = self.qkv(x).view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # [B, H, T, hs] each
        start = cache.length if cache is not None else 0
        pos = torch.arange(start, start + T, device=x.device)
        q, k = _rope(q, pos, self.cfg.rope_base), _rope(k, pos, self.cfg.rope_base)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if start + T > cache.capacity:
                raise ValueError(f"KV cache full: {start} + {T} tokens > capacity {cache.capacity}")
            cache.k[layer, :, :, start : start + T] = k
            cache.v[layer, :, :, start : start + T] = v
            ks, vs = cache.k[layer, :, :, : start + T], cache.v[layer, :, :, : start + T]
            if T == 1:
                y = F.scaled_dot_product_attention(q, ks, vs)
            else:  # a prompt after a filled cache: query i sees keys <= start + i
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start)
                y = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.att = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, cfg.ffn_mult * cfg.n_embd, bias=False),
            nn.GELU(),
            nn.Linear(cfg.ffn_mult * cfg.n_embd, cfg.n_embd, bias=False),
        )

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.att(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A GPT-style softmax-attention language model: ``model(tokens)`` or ``model(tokens, cache)``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = (
                    0.02 / math.sqrt(2 * cfg.n_layer)
                    if name.endswith(("proj.weight", "mlp.2.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        p = self.head.weight
        return KVCache(self.config, batch, capacity, device=p.device, dtype=p.dtype)

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """tokens [B, T] -> logits [B, T, V] float32; with ``cache`` the keys and values are appended."""
        x = self.emb(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.head(self.ln_out(x)).float()
