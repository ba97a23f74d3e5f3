"""The one-call native decode step (rwkvkit/ops/_decode_cpu.c) and the Q8_0 int8 matrices.

The step must give the PyTorch modules' numbers (which the parity tests tie to the reference) for
Eagle and Finch, fp32 / bf16 / int8 matrices (fp16: tests/test_native_rows1.py), one or many rows; it must leave the incoming state
alone, notice when the model's tensors change under it, and stand aside when it cannot apply.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rwkvkit
from rwkvkit.models import engine
from rwkvkit.models.quant import Int8Linear
from rwkvkit.ops import decode as native
from rwkvkit.testing import random_checkpoint
from tests.reference import load_reference, reference_logits

pytestmark = pytest.mark.skipif(not native.available(), reason="native decode kernels not built")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("ns")
    out = {}
    for version in (5, 6):
        for dt, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            p = d / f"v{version}-{tag}.pth"
            random_checkpoint(version, 3, 128, 700, head_size=32, dtype=dt, seed=version, path=p)
            out[version, tag] = p
    out[6, "odd"] = d / "v6-odd.pth"  # C = 72, F = 252: rows that end in a partial 16-lane vector
    random_checkpoint(6, 2, 72, 700, head_size=24, seed=9, path=out[6, "odd"])
    return out


def _steps(model, tokens: torch.Tensor, backend: str):
    """Token-by-token logits [B, T, V] and the final state."""
    state, outs = None, []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t : t + 1], state, backend=backend)
            outs.append(logits[:, 0])
    return torch.stack(outs, 1), state


def _tokens(B: int, T: int, V: int = 700, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("version, tag", [(5, "fp32"), (6, "fp32"), (6, "odd")])
@pytest.mark.parametrize("B", [1, 6])  # 6: the kernels' 4-row input tiles plus a remainder
def test_native_step_matches_pytorch_modules_fp32(paths, version, tag, B):
    model = rwkvkit.load(paths[version, tag])
    tokens = _tokens(B, 12)
    got, st_got = _steps(model, tokens, "auto")
    assert model.native_step() is not None  # the step really ran
    want, st_want = _steps(model, tokens, "naive")
    assert (got - want).abs().max().item() <= 5e-5
    for k in st_want.tensors:
        assert (st_got[k] - st_want[k]).abs().max().item() <= 5e-5, k


@pytest.mark.parametrize("version", [5, 6])
def test_bf16_matrices_give_the_reference_fp32_logits(paths, version):
    """bf16 weights widened exactly, activations kept fp32: the reference's 'cpu fp32' on the same file."""
    path = paths[version, "bf16"]
    tokens = _tokens(1, 24, seed=2)[0].tolist()
    want, _ = reference_logits(load_reference(path), tokens)
    model = rwkvkit.load(path, dtype=torch.bfloat16)
    got, _ = _steps(model, torch.tensor([tokens]), "auto")
    assert model.native_step() is not None
    assert (got[0] - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("version", [5, 6])
def test_int8_step_equals_fp32_step_on_the_dequantised_weights(paths, version):
    """The Q8_0 kernels compute exactly the products of the dequantised matrices (float32 activations:
    batch_bf16=False, as one row; the batched bf16 activations are tests/test_native_batch.py's)."""
    q8 = rwkvkit.load(paths[version, "bf16"], quantize="int8").set_kernels(batch_bf16=False)
    deq = rwkvkit.load(paths[version, "bf16"])
    with torch.no_grad():
        for name, mod in q8.named_modules():
            if isinstance(mod, Int8Linear):
                deq.get_submodule(name).weight.copy_(mod.weight)
    tokens = _tokens(3, 10, seed=4)
    got, _ = _steps(q8, tokens, "auto")
    want, _ = _steps(deq, tokens, "auto")
    assert (got - want).abs().max().item() <= 5e-5
    # the modules (bf16 activations between matrices, like a bf16 model) stay close
    mod, _ = _steps(q8, tokens, "naive")
    assert (mod - got).abs().mean().item() <= 0.02 * got.std().item()


def test_incoming_state_is_not_modified(paths):
    model = rwkvkit.load(paths[6, "fp32"])
    with torch.no_grad():
        _, st = model([1, 2, 3])
        before = st.clone()
        a, st2 = model([4], st)
        b, _ = model([4], st)
    for k in st.tensors:
        assert torch.equal(st[k], before[k]), k
        assert not torch.equal(st2[k], st[k]), k
    assert torch.equal(a, b)


def test_plan_follows_changes_to_the_model(paths):
    model = rwkvkit.load(paths[6, "fp32"])
    with torch.no_grad():
        _, st = model([1, 2])
        first, _ = model([3], st)
        plan = model.native_step()
        # a parameter's storage swapped under the same tensor object
        w = model.blocks[1].ffn.value.weight
        w.data = w.data * 2
        assert not plan.valid()
        doubled, _ = model([3], st)
        want, _ = model([3], st, backend="naive")
        assert (doubled - want).abs().max().item() <= 5e-5
        assert (doubled - first).abs().max().item() > 1e-3
        # a module replaced
        model.blocks[0].att.key = Int8Linear(model.blocks[0].att.key.weight)
        assert not model._native_step.valid()
        got, _ = model([3], st)
        want, _ = model([3], st, backend="naive")
        assert (got - want).abs().max().item() <= 2e-2  # the int8 module returns bf16
        assert (got - doubled).abs().max().item() > 1e-3
        # .to(): plan dropped, rebuilt for the new tensors
        model.to(torch.bfloat16)
        assert model._native_step is None


def test_plan_looks_the_modules_up_again_only_after_a_registration(paths):
    model = rwkvkit.load(paths[6, "fp32"])
    with torch.no_grad():
        model([1])
    plan = model.native_step()
    assert plan.valid() and plan.registrations == engine._registrations
    att = model.blocks[0].att
    att.key = att.key  # set again, the same module: a registration, nothing changed
    assert plan.registrations != engine._registrations
    assert plan.valid() and plan.registrations == engine._registrations
    model.blocks[1].ffn.key.weight = torch.nn.Parameter(model.blocks[1].ffn.key.weight.detach().clone())
    assert not plan.valid()  # a new parameter, at a new address: the plan is rebuilt
    assert model.native_step() is not plan


def test_step_stands_aside_when_it_cannot_apply(paths, tmp_path):
    v4 = tmp_path / "v4.pth"
    random_checkpoint(4, 2, 64, 300, head_size=64, path=v4)
    m4 = rwkvkit.load(v4)
    with torch.no_grad():
        m4([1])
    assert m4._native_step is None
    model = rwkvkit.load(paths[6, "fp32"])
    model.requires_grad_(True)
    logits, _ = model([5])  # gradients wanted: the modules run, and the graph exists
    assert logits.requires_grad and model._native_step is None
    frozen = rwkvkit.load(paths[6, "fp32"])  # frozen weights, but a state that is being tuned
    st = frozen.init_state()
    st.tensors["wkv"].requires_grad_(True)
    logits, _ = frozen([5], st)
    logits.sum().backward()
    assert st["wkv"].grad is not None and st["wkv"].grad.abs().sum() > 0


def test_portable_kernels_match(paths):
    """The non-AVX-512 C fallback gives the same logits (run in a child with it forced); two steps,
    both through the native step, so the two runs differ only in the kernels' summation order."""
    code = (
        "import torch, rwkvkit, sys\n"
        "from rwkvkit.ops import decode\n"
        "assert decode._decode_cpu.avx512 == 0\n"
        "out = []\n"
        "for p, kw in [(sys.argv[1], {}), (sys.argv[2], dict(quantize='int8', dtype=torch.bfloat16)),"
        " (sys.argv[2], dict(dtype=torch.bfloat16))]:\n"
        "    m = rwkvkit.load(p, **kw)\n"
        "    with torch.no_grad():\n"
        "        _, s = m(torch.tensor([[1], [3]]))\n"
        "        out.append(m(torch.tensor([[5], [6]]), s)[0])\n"
        "torch.save(out, sys.argv[3])\n"
    )
    dst = paths[6, "fp32"].parent / "portable.pt"
    env = dict(os.environ, RWKVKIT_PORTABLE_KERNELS="1")
    args = [sys.executable, "-c", code, str(paths[6, "fp32"]), str(paths[6, "bf16"]), str(dst)]
    subprocess.run(args, check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    got = torch.load(dst)
    for g, (p, kw) in zip(
        got,
        [
            (paths[6, "fp32"], {}),
            (paths[6, "bf16"], dict(quantize="int8", dtype=torch.bfloat16)),
            (paths[6, "bf16"], dict(dtype=torch.bfloat16)),
        ],
    ):
        m = rwkvkit.load(p, **kw)
        with torch.no_grad():
            _, s = m(torch.tensor([[1], [3]]))
            want = m(torch.tensor([[5], [6]]), s)[0]
        assert (g - want).abs().max().item() <= 5e-5  # summation order only


# ---- Q8_0 matrices ---------------------------------------------------------------------------------


def test_q8_quantisation_error_is_within_half_a_step():
    w = torch.randn(96, 256) * torch.logspace(-3, 0, 256)  # blocks of very different magnitudes
    w[3, :32] = 0  # an all-zero block
    lin = Int8Linear(w)
    assert lin.weight_int8.dtype == torch.int8 and lin.scale.shape == (96, 8)
    step = lin.scale.float().repeat_interleave(32, dim=1)
    err = (lin.weight - w).abs()
    assert (err <= step / 2 * 1.01 + 1e-7).all()
    assert (lin.weight[3, :32] == 0).all()
    assert lin.weight_int8.abs().max().item() == 127


@pytest.mark.parametrize("M", [1, 3, 5, 40])  # 40: the dequantise-then-bf16-matmul path
def test_q8_products_equal_the_dequantised_matrix(M):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 320, generator=g) / 10
    lin = Int8Linear(w)
    x = torch.randn(M, 320, generator=g)
    want = x @ lin.weight.T
    exact = native.q8_matmul(x, lin.weight_int8, lin.scale)  # the decode kernel: float32 throughout
    assert (
        exact.dtype == torch.float32 and (exact - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    )
    got = lin(x)  # the module hands bf16 on, like a bf16 model's matrices
    assert got.dtype == torch.bfloat16 and got.shape == (M, 200)
    tol = 1e-2 if M <= 32 else 3e-2  # bf16 rounding of the output (and, for prompts, of inputs and weights)
    assert (got.float() - want).abs().max().item() <= tol * want.abs().max().item()


def test_int8_models_run_without_the_native_kernels(paths, monkeypatch):
    """Without the C extension (no compiler at install): PyTorch dequantises; same numbers up to bf16."""
    model = rwkvkit.load(paths[6, "bf16"], quantize="int8", dtype=torch.bfloat16)
    tokens = _tokens(2, 6, seed=5)
    with torch.no_grad():
        _, st = model(tokens)
        want, _ = model(tokens[:, :1], st)  # the native step
        monkeypatch.setattr(native, "_decode_cpu", None)
        assert not engine.enabled()
        whole, st2 = model(tokens)
        got, _ = model(tokens[:, :1], st2)
    assert torch.isfinite(whole).all()
    assert (got - want).abs().mean().item() <= 0.02 * want.std().item()
