"""Reduced-precision paths: bf16 and fp16 matrices, int8 weights. The WKV state stays fp32 in all."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit.models.quant import Int8Linear
from rwkvkit.testing import random_checkpoint


@pytest.fixture(scope="module", params=[6, 7], ids=["finch", "goose"])
def bf16_path(tmp_path_factory, request):
    path = tmp_path_factory.mktemp("ckpt") / f"rwkv{request.param}.pth"
    random_checkpoint(request.param, 4, 128, 2000, head_size=32, dtype=torch.bfloat16, path=path)
    return path


def _run(model, tokens):
    with torch.no_grad():
        whole, st = model(tokens)
        step, _ = model(tokens[-1:], st)
    return whole[0], step[0, 0], st


@pytest.mark.parametrize(
    "kw,max_err,agree",
    [
        (dict(dtype=torch.bfloat16), 0.3, 0.9),
        (dict(dtype=torch.float16), 0.1, 0.95),
        (dict(quantize="int8"), 1.5, 0.9),
    ],
    ids=["bf16", "fp16", "int8"],
)
def test_reduced_precision_close_to_fp32(bf16_path, kw, max_err, agree):
    tokens = torch.randint(0, 2000, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    ref, ref_step, _ = _run(rwkvkit.load(bf16_path), tokens)
    model = rwkvkit.load(bf16_path, **kw)
    got, got_step, st = _run(model, tokens)
    assert torch.isfinite(got).all()
    assert st["wkv"].dtype == torch.float32
    err = (got - ref).abs()
    assert err.max().item() <= max_err, err.max().item()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= agree
    assert (got_step - ref_step).abs().max().item() <= max_err
    # sanity: the error is far below the logits' own spread (the test could fail)
    assert err.mean().item() < 0.05 * ref.std().item()


def test_int8_layers_replace_every_matrix(bf16_path):
    model = rwkvkit.load(bf16_path, quantize="int8")
    n_int8 = sum(isinstance(m, Int8Linear) for m in model.modules())
    per_layer = 5 + 3 if model.config.version == 6 else 4 + 2  # Goose: att r,k,v,o + ffn k,v
    assert n_int8 == 4 * per_layer + 1  # per layer: att r,k,v,g,o + ffn k,r,v; plus the head
    w = model.blocks[0].att.key
    assert w.weight_int8.dtype == torch.int8


@pytest.mark.parametrize("version", [5, 7])
def test_fp16_rescaling_keeps_deep_models_finite(tmp_path, version):
    path = tmp_path / "deep.pth"
    sd = random_checkpoint(version, 13, 64, 500, head_size=32)
    for k in sd:  # blow up the channel-mix output so an unscaled fp16 residual would overflow
        if k.endswith("ffn.value.weight"):
            sd[k] = sd[k] * 40
    torch.save(sd, path)
    tokens = list(range(1, 40))
    ref, _, _ = _run(rwkvkit.load(path), tokens)
    model = rwkvkit.load(path, dtype=torch.float16)
    assert model.rescale_every == 6
    got, _, _ = _run(model, tokens)
    assert torch.isfinite(got).all()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
