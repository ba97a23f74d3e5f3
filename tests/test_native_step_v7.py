"""RWKV-7's one-call native decode step (rwkvkit/ops/_decode_v7.c, rwkvkit/models/rwkv7_step.py).

As Finch's step (test_native_step.py): the PyTorch modules' numbers in fp32, the reference's 'cpu fp32'
logits on a bf16 file, int8 equal to the dequantised matrices, one or many rows, the portable kernels
equal to the AVX-512 ones, the incoming state left alone, the plan following changes to the model.
"""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit import kernels
from rwkvkit.models import rwkv7_step
from rwkvkit.models.quant import Int8Linear
from rwkvkit.ops import decode_v7
from rwkvkit.testing import random_checkpoint
from tests.reference import load_reference, reference_logits

pytestmark = pytest.mark.skipif(not decode_v7.available(), reason="_decode_v7 not built")

V = 700


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("ns7")
    out = {}
    for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        out[tag] = d / f"v7-{tag}.pth"
        random_checkpoint(7, 3, 128, V, head_size=32, dtype=dt, seed=7, path=out[tag])
    out["n64"] = d / "v7-n64.pth"  # head size 64: the WKV step's AVX-512 variant
    random_checkpoint(7, 2, 128, V, head_size=64, dtype=torch.float32, seed=8, path=out["n64"])
    out["odd"] = d / "v7-odd.pth"  # C = 72: rows that end in a partial 16-lane vector
    random_checkpoint(7, 2, 72, V, head_size=24, dtype=torch.float32, seed=9, path=out["odd"])
    return out


def _steps(model, tokens: torch.Tensor, native: bool):
    """Token-by-token logits [B, T, V] and the final state, with the native step on or off."""
    model.set_kernels(native_step=native)
    model._native_step = None  # built again only if the step runs
    state, outs = None, []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t : t + 1], state)
            outs.append(logits[:, 0])
    assert (model._native_step is not None) == native  # the path asked for really ran
    return torch.stack(outs, 1), state


def _tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("which", ["fp32", "n64", "odd"])
@pytest.mark.parametrize("B", [1, 6])  # 6: the matrix kernels' 4-row input tiles plus a remainder
def test_native_step_matches_pytorch_modules_fp32(paths, which, B):
    model = rwkvkit.load(paths[which])
    tokens = _tokens(B, 12)
    got, st_got = _steps(model, tokens, True)
    want, st_want = _steps(model, tokens, False)
    assert (got - want).abs().max().item() <= 5e-5
    for k in st_want.tensors:
        assert (st_got[k] - st_want[k]).abs().max().item() <= 5e-5, k


def test_portable_kernels_equal_the_avx512_ones(paths, monkeypatch):
    model = rwkvkit.load(paths["n64"])
    tokens = _tokens(2, 8, seed=1)
    fast, _ = _steps(model, tokens, True)
    monkeypatch.setattr(kernels, "PORTABLE", True)
    plain, _ = _steps(model, tokens, True)
    assert (fast - plain).abs().max().item() <= 5e-5


def test_bf16_matrices_are_widened_exactly(paths):
    """A bf16 model's step = the fp32 PyTorch modules on the same file (matrices widened exactly,
    activations fp32: ``batch_bf16=False``, as two rows would otherwise take bf16 activations,
    test_native_batch's), given the same embedding: the bf16 model folds ln0 in bf16, as the reference's
    x070 class does after converting (the fp32 model's parity with the reference is test_model_parity_v7's)."""
    tokens = _tokens(2, 16, seed=2)
    bf16 = rwkvkit.load(paths["bf16"], dtype=torch.bfloat16).set_kernels(batch_bf16=False)
    fp32 = rwkvkit.load(paths["bf16"])
    with torch.no_grad():
        fp32.emb.weight.copy_(bf16.emb.weight.float())
    got, st_got = _steps(bf16, tokens, True)
    want, st_want = _steps(fp32, tokens, False)
    assert (got - want).abs().max().item() <= 1e-4
    assert (st_got["wkv"] - st_want["wkv"]).abs().max().item() <= 1e-4


def test_fp32_step_gives_the_reference_logits(paths):
    tokens = _tokens(1, 16, seed=3)[0].tolist()
    want, _ = reference_logits(load_reference(paths["fp32"]), tokens)
    got, _ = _steps(rwkvkit.load(paths["fp32"]), torch.tensor([tokens]), True)
    assert (got[0] - want).abs().max().item() <= 1e-4


def test_int8_step_equals_fp32_step_on_the_dequantised_weights(paths):
    q8 = rwkvkit.load(paths["bf16"], quantize="int8").set_kernels(
        batch_bf16=False
    )  # 3 rows, fp32 activations
    deq = rwkvkit.load(paths["bf16"])
    with torch.no_grad():
        for name, mod in q8.named_modules():
            if isinstance(mod, Int8Linear):
                deq.get_submodule(name).weight.copy_(mod.weight)
            elif name.endswith(".att"):  # the LoRAs stay bf16 in the int8 model: the same values
                for p in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"):
                    getattr(deq.get_submodule(name), p).copy_(getattr(mod, p).float())
    tokens = _tokens(3, 10, seed=4)
    got, _ = _steps(q8, tokens, True)
    want, _ = _steps(deq, tokens, True)
    assert (got - want).abs().max().item() <= 5e-5
    mod, _ = _steps(q8, tokens, False)  # the modules round activations to bf16: close, not equal
    assert (mod - got).abs().mean().item() <= 0.02 * got.std().item()


def test_state_is_not_modified_and_the_plan_follows_the_model(paths):
    model = rwkvkit.load(paths["fp32"])
    with torch.no_grad():
        _, st = model([1, 2, 3])
        before = st.clone()
        first, st2 = model([4], st)
        again, _ = model([4], st)
        for k in st.tensors:
            assert torch.equal(st[k], before[k]), k
            assert not torch.equal(st2[k], st[k]), k
        assert torch.equal(first, again)
        plan = model.native_step()
        w = model.blocks[2].att.a2
        w.data = w.data * 3  # a LoRA's storage swapped under the same parameter
        assert not plan.valid()
        changed, _ = model([4], st)
        want, _ = model.set_kernels(native_step=False)([4], st)
        assert (changed - want).abs().max().item() <= 5e-5
        assert (changed - first).abs().max().item() > 1e-3


def test_describe_names_the_step(paths):
    model = rwkvkit.load(paths["bf16"], dtype=torch.bfloat16)
    line = next(x for x in model.describe().splitlines() if "one-token step" in x)
    assert "_decode_v7" in line and "not faster" not in line
    assert rwkv7_step.kernel() in line
    fp16 = rwkvkit.load(paths["fp32"], dtype=torch.float16)  # layer rescaling in the plan
    assert fp16.native_step() is not None
    line = next(x for x in fp16.describe().splitlines() if "one-token step" in x)
    assert "_decode_v7" in line and "not faster" not in line


def test_modules_run_without_the_extension(paths, monkeypatch):
    """Without _decode_v7 (no compiler at install) one-token calls run the PyTorch modules, even with a
    plan cached from before."""
    model = rwkvkit.load(paths["fp32"])
    tokens = _tokens(1, 4, seed=6)
    with torch.no_grad():
        _, st = model(tokens)
        want, _ = model(tokens[:, :1], st)  # the native step, whose plan is now cached
        assert model._native_step is not None
        monkeypatch.setattr(decode_v7, "_decode_v7", None)
        got, _ = model(tokens[:, :1], st)
    assert (got - want).abs().max().item() <= 5e-5
    assert "_decode_v7 extension is not built" in model.describe()
