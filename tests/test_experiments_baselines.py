"""The baselines: selective scan (loop == per-step reference, outputs and gradients), the transformer's
KV cache (decode == full forward), Mamba's causality, and the five models built by name."""

from __future__ import annotations

import pytest
import torch

from rwkvkit.experiments.baselines import (
    Mamba,
    MambaConfig,
    Transformer,
    TransformerConfig,
    mamba_ssm_available,
    selective_scan,
    selective_scan_ref,
)
from rwkvkit.experiments.models import KINDS, build


def _scan_inputs(Bb=2, Dc=6, N=4, T=37, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    return [
        r(Bb, Dc, T), r(Bb, Dc, T) * 0.5, -(torch.rand(Dc, N, generator=g, dtype=dtype) + 0.2),
        r(Bb, N, T), r(Bb, N, T), r(Dc), r(Bb, Dc, T), r(Dc) * 0.1,
    ]  # fmt: skip


@pytest.mark.parametrize("segment", [1, 8, 64])
def test_selective_scan_loop_matches_reference_with_gradients(segment):
    xs = [x.requires_grad_() for x in _scan_inputs()]
    y_ref = selective_scan_ref(*xs, True)
    gy = torch.randn_like(y_ref)
    g_ref = torch.autograd.grad(y_ref, xs, gy)
    y = selective_scan(*xs, True, backend="loop", segment=segment)
    g = torch.autograd.grad(y, xs, gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_selective_scan_reference_is_the_recurrence():
    u, delta, A, B, C, *_ = _scan_inputs(Bb=1, Dc=2, N=3, T=5)
    y = selective_scan_ref(u, delta, A, B, C)
    h = torch.zeros(2, 3, dtype=torch.float64)
    for t in range(5):  # h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t; y_t = C_t . h_t
        h = (
            torch.exp(delta[0, :, t, None] * A) * h
            + delta[0, :, t, None] * B[0, None, :, t] * u[0, :, t, None]
        )
        torch.testing.assert_close(y[0, :, t], h @ C[0, :, t])


def test_selective_scan_fp32_and_errors():
    xs = [x.float() for x in _scan_inputs(T=20)]
    torch.testing.assert_close(selective_scan(*xs, True), selective_scan_ref(*xs, True), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        selective_scan(*xs, backend="triton")
    if not mamba_ssm_available():
        with pytest.raises(ValueError, match="mamba-ssm"):
            selective_scan(*xs, backend="cuda")


def test_transformer_kv_cache_decode_equals_full_forward():
    torch.manual_seed(0)
    tf = Transformer(TransformerConfig(2, 64, 50, head_size=16)).eval()
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = tf(tokens)
        cache = tf.new_cache(2, 16)
        parts = [tf(tokens[:, :5], cache)]  # a prompt, then one token at a time, then a 3-token piece
        parts += [tf(tokens[:, t : t + 1], cache) for t in range(5, 9)]
        parts.append(tf(tokens[:, 9:12], cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12 and cache.nbytes() == 2 * 2 * 2 * 64 * 12 * 4  # K and V, L, B, C, T, fp32
    with pytest.raises(ValueError, match="KV cache full"):
        tf(tokens[:, :5], cache)


@pytest.mark.parametrize("kind", ["mamba", "attention", "finch", "eagle", "rwkv4"])
def test_models_are_causal(kind):
    lm = build(kind, 2, 32, 40, head_size=16, seed=0).eval()
    if kind in ("finch", "eagle", "rwkv4"):  # RWKV-LM's init zeroes the output matrices: perturb them
        with torch.no_grad():
            for p in lm.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    a = torch.randint(0, 40, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 40
    with torch.no_grad():
        la, lb = lm(a), lm(b)
    torch.testing.assert_close(la[:, :6], lb[:, :6], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(la[:, 6:], lb[:, 6:])


def test_build_knows_the_five_models():
    assert KINDS == ("rwkv4", "eagle", "finch", "attention", "mamba")
    versions = {k: build(k, 2, 64, 128).net.config for k in ("rwkv4", "eagle", "finch")}
    assert [c.version for c in versions.values()] == [4, 5, 6]
    assert isinstance(build("mamba", 2, 64, 128).net, Mamba)
    assert isinstance(build("attention", 2, 64, 128).net, Transformer)
    with pytest.raises(ValueError, match="unknown model"):
        build("hyena", 2, 64, 128)


def test_mamba_trains_a_step():
    torch.manual_seed(0)
    m = Mamba(MambaConfig(1, 16, 20))
    x = torch.randint(0, 20, (2, 9))
    loss = torch.nn.functional.cross_entropy(m(x).reshape(-1, 20), x.roll(-1, 1).reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the GPU preset trains (the scan stays fp32)
        logits = m(x)
    torch.nn.functional.cross_entropy(logits.float().reshape(-1, 20), x.roll(-1, 1).reshape(-1)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
