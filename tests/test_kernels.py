"""The kernel choice (rwkvkit.kernels): an argument of load() and of the model, reported by
model.describe() and `rwkvkit info`, with the reason whenever a faster path is not taken."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit import kernels
from rwkvkit.info import main as info_main
from rwkvkit.models.common import fusable
from rwkvkit.ops import decode, fused, matmul
from rwkvkit.testing import random_checkpoint


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("k")
    out = {}
    for version in (4, 6):
        out[version] = d / f"v{version}.pth"
        random_checkpoint(version, 2, 64, 100, head_size=32, path=out[version])
    return out


def _line(text: str, part: str) -> str:
    return next(s for s in text.splitlines() if s.strip().startswith(part))


def test_describe_names_every_part_and_why_not_faster(paths):
    text = rwkvkit.load(paths[6], dtype=torch.float16).describe()
    assert text.startswith("Finch (RWKV-6): L2 C64 H2x32") and "dtype fp16" in text
    for part in ("WKV", "element-wise chains", "prompt matmuls", "one-token step", "head"):
        assert _line(text, part)
    assert "_decode_cpu" in _line(text, "one-token step") and "not faster" not in _line(
        text, "one-token step"
    )
    assert "AMX matmul: it takes bf16, this model is fp16" in _line(text, "prompt matmuls")
    assert "fp32 products of the widened fp16 weights" in _line(text, "prompt matmuls")
    v4 = rwkvkit.load(paths[4]).describe()
    assert "RWKV-4 has no native one-token step" in _line(v4, "one-token step")
    assert "no native WKV kernel for RWKV-4" in _line(v4, "WKV")
    if not matmul.available():
        bf16 = rwkvkit.load(paths[6], dtype=torch.bfloat16).describe()
        assert f"AMX matmul: {matmul.unavailable_reason()}" in _line(bf16, "prompt matmuls")


@pytest.mark.skipif(not decode.available(), reason="native decode kernels not built")
def test_the_native_step_is_chosen_by_argument(paths):
    model = rwkvkit.load(paths[6], kernels=kernels.Kernels(native_step=False))
    assert "switched off (kernels.native_step=False)" in _line(model.describe(), "one-token step")
    with torch.no_grad():
        _, st = model([1, 2, 3])
        off, _ = model([4], st)
        assert model._native_step is None  # the PyTorch modules ran
        on, _ = model.set_kernels(native_step=True)([4], st)
        assert model._native_step is not None
    assert (on - off).abs().max() <= 5e-5
    assert "native one-call C step" in _line(model.describe(), "one-token step")
    with pytest.raises(TypeError, match="unknown kernel choices"):
        model.set_kernels(native_stepp=False)


def test_the_choice_is_in_force_only_inside_the_model_call(paths):
    att, x = rwkvkit.load(paths[6]).blocks[0].att, torch.zeros(1, 2, 64)
    with torch.no_grad():
        assert fusable(att, x, torch.float32) == fused.available()
        with kernels.using(kernels.Kernels(fused=False)):
            assert not fusable(att, x, torch.float32)
        assert kernels.active() == kernels.Kernels.default()


def test_info_command(paths, capsys):
    assert info_main([str(paths[6]), "--dtype", "bf16", "--no-fused"]) == 0
    out = capsys.readouterr().out
    assert "Finch (RWKV-6)" in out and "dtype bf16" in out
    assert "switched off (kernels.fused=False)" in _line(out, "element-wise chains")
    assert info_main([str(paths[6].with_name("missing.pth"))]) == 1
    assert info_main([str(paths[6]), "--dtype", "bf16", "--quantize", "int8"]) == 0
    out = capsys.readouterr().out
    assert "dtype bf16 (embedding and LoRAs; matrices int8;" in out and "quantisation int8" in out


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_dtype_is_the_load_dtype_by_name_or_torch_dtype(paths, quantize):
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert rwkvkit.load(paths[6], dtype=name, quantize=quantize).dtype == dt
        assert rwkvkit.load(paths[6], dtype=dt, quantize=quantize).dtype == dt
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        rwkvkit.load(paths[6], dtype="fp8")


@pytest.mark.skipif(not decode.available(), reason="native decode kernels not built")
def test_portable_kernels_by_argument_and_named_c_arguments():
    had = decode._decode_cpu.avx512
    try:
        kernels.set_portable(True)
        assert decode._decode_cpu.avx512 == 0 and not matmul.available() and not fused.lora_available()
        assert "portable" in matmul.unavailable_reason() or matmul._matmul_cpu is None
    finally:
        kernels.set_portable(False)
    assert decode._decode_cpu.avx512 == had
    x, w = torch.randn(2, 64), torch.randn(32, 64)
    with pytest.raises(TypeError, match="missing argument 'threads'"):
        decode._decode_cpu.matmul(
            kind=0, w=w.data_ptr(), s=0, n=32, k=64, x=x.data_ptr(), m=2, y=x.data_ptr(), act_bf16=0
        )
    with pytest.raises(TypeError, match="unknown argument 'thread'"):
        decode._decode_cpu.matmul(
            kind=0, w=0, s=0, n=32, k=64, x=0, m=2, y=0, act_bf16=0, threads=1, thread=1
        )
    with pytest.raises(TypeError, match="keyword arguments only"):
        decode._decode_cpu.matmul(0)
