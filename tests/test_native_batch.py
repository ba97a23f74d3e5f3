"""The native step with several rows (rwkvkit/ops/_decode_bf16.c, in Eagle's and Finch's step and in
Goose's): bf16 activations for bf16 and int8 matrices (``Kernels.batch_bf16``), against PyTorch's products on the same rounded inputs, against the
same rows stepped one at a time, and independent of the other rows of the batch."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit import kernels
from rwkvkit.models.quant import Int8Linear
from rwkvkit.ops import decode as native
from rwkvkit.ops import decode_v7
from rwkvkit.testing import random_checkpoint

pytestmark = pytest.mark.skipif(not native.available(), reason="native decode kernels not built")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("nb")
    out = {}
    for version in (5, 6, 7):
        out[version] = d / f"v{version}.pth"
        random_checkpoint(
            version, 2, 128, 600, head_size=32, dtype=torch.bfloat16, seed=version, path=out[version]
        )
    return out


VERSIONS = [
    5,
    6,
    pytest.param(7, marks=pytest.mark.skipif(not decode_v7.available(), reason="no _decode_v7")),
]


def _load(path, quant: str):
    if quant == "int8":
        return rwkvkit.load(path, quantize="int8", dtype=torch.bfloat16)
    return rwkvkit.load(path, dtype=torch.bfloat16)


def _steps(model, tokens: torch.Tensor):
    """Token-by-token logits [B, T, V] (native step: B >= 1, T == 1 per call) and the final state."""
    state, outs = None, []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model(tokens[:, t : t + 1], state)
            outs.append(logits[:, 0])
    assert model.native_step() is not None
    return torch.stack(outs, 1), state


def _tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 600, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the kernels alone ------------------------------------------------------------------------------


@pytest.mark.parametrize("M", [1, 2, 4, 6, 17])  # the 4-row input tiles and their remainders
@pytest.mark.parametrize("K", [96, 320, 100])  # 100: not a multiple of 32, the plain-C path
def test_bf16_activation_products_equal_torch_on_rounded_inputs(M, K):
    g = torch.Generator().manual_seed(M * 1000 + K)
    w = (torch.randn(202, K, generator=g) / 10).to(torch.bfloat16)  # 202 rows: tiles of 4 and of 1
    x = torch.randn(M, K, generator=g)
    want = x.to(torch.bfloat16).double() @ w.double().T
    got = native.dense_matmul(x, w, act_bf16=True)
    assert got.dtype == torch.float32 and got.shape == (M, 202)
    scale = (x.to(torch.bfloat16).double().abs() @ w.double().abs().T).max().item()
    assert (got.double() - want).abs().max().item() <= 1e-6 * scale  # fp32 sums, exact products
    exact = native.dense_matmul(x, w)  # float32 activations: differs by the rounding of x only
    assert (exact.double() - x.double() @ w.double().T).abs().max().item() <= 1e-6 * scale
    assert not torch.equal(exact, got)
    if K % 32 == 0:  # Q8_0: the matrix dequantised to bf16 exactly as a prompt's (q8_dequantize_bf16)
        lin = Int8Linear(w.float())
        wq = native.q8_dequantize_bf16(lin.weight_int8, lin.scale)
        want = x.to(torch.bfloat16).double() @ wq.double().T
        got = native.q8_matmul(x, lin.weight_int8, lin.scale, act_bf16=True)
        assert (got.double() - want).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("rows", [3, 5, 10, 16, 17, 40])  # the row kernel, the bf16-row kernel, oneDNN/AMX
def test_short_prompt_products_equal_exact_ones(rows):
    """A bf16 ``Linear`` and an ``Int8Linear`` on a few bf16 rows (a short prompt) give the exact
    products of those rows with their matrix, summed in fp32 and rounded once to bf16, whichever
    kernel takes them."""
    from rwkvkit.models.common import Linear

    g = torch.Generator().manual_seed(rows)
    lin = Linear(96, 160).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(160, 96, generator=g) / 10)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    q8 = Int8Linear(lin.weight.float())
    # int8: up to 4 rows the kernel multiplies q * scale in fp32, more rows the matrix dequantised to
    # bf16 as a long prompt's
    deq = q8.weight.float() if rows <= 4 else native.q8_dequantize_bf16(q8.weight_int8, q8.scale)
    for layer, w in ((lin, lin.weight), (q8, deq)):
        want = x.double() @ w.double().T
        with torch.no_grad():
            got = layer(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 160)
        scale = (x.double().abs() @ w.double().abs().T).max().item()
        assert ((got.double() - want).abs() <= 2**-8 * want.abs() + 1e-5 * scale).all(), type(layer).__name__


# ---- the step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_a_row_does_not_depend_on_the_other_rows(paths, version, quant):
    """Bit for bit: a row's logits and state are the same in a batch of 9 as in a batch of 2 with
    another companion, in another position (every output is computed by the same operations)."""
    model = _load(paths[version], quant)
    tokens = _tokens(9, 5, seed=1)
    big, st_big = _steps(model, tokens)
    pick = [7, 2]
    small, st_small = _steps(model, tokens[pick])
    assert torch.equal(big[pick], small)
    for k in st_big.tensors:
        assert torch.equal(st_big[k][:, pick], st_small[k])  # [L, B, ...]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("quant", ["bf16", "int8"])
def test_batched_step_equals_one_row_steps(paths, version, quant):
    """batch_bf16=False: the rows of a batch are the rows stepped alone (float32 activations in both, up
    to the order of sums); batch_bf16=True (default): the same within the bf16 rounding of the matrices'
    inputs, and the same greedy tokens where the one-row logits do not nearly tie."""
    model = _load(paths[version], quant)
    tokens = _tokens(6, 8, seed=3)
    alone = torch.cat([_steps(model, tokens[b : b + 1])[0] for b in range(6)])
    fp32_act, _ = _steps(model.set_kernels(batch_bf16=False), tokens)
    # one row alone takes _decode_rows1.c's dot kernels where the CPU has them: x kept to ~16 bits
    # (two bf16 parts; int8: two 8-bit digits per block of 32), not fp32's 24 (tests/test_native_rows1.py)
    dot = native._decode_cpu.dot_vnni if quant == "int8" else native._decode_cpu.dot_bf16
    assert (fp32_act - alone).abs().max().item() <= ((3e-3 if quant == "int8" else 3e-4) if dot else 5e-5)
    got, _ = _steps(model.set_kernels(batch_bf16=True), tokens)
    err = (got - alone).abs()
    assert err.max().item() > 0  # the bf16 path really ran
    assert err.mean().item() <= 0.01 * alone.std().item()
    assert err.max().item() <= 0.1 * alone.std().item()
    top2 = alone.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * err.max()
    assert (got.argmax(-1) == alone.argmax(-1))[clear].all()


def test_fp32_models_keep_fp32_activations(paths):
    model = rwkvkit.load(paths[6], dtype=torch.float32)
    tokens = _tokens(5, 4, seed=4)
    on, _ = _steps(model, tokens)
    off, _ = _steps(model.set_kernels(batch_bf16=False), tokens)
    assert (on - off).abs().max().item() <= 5e-5


@pytest.mark.parametrize("version", [6, 7])
def test_describe_reports_the_batched_activations(paths, version):
    model = _load(paths[version], "bf16")
    line = next(s for s in model.describe().splitlines() if s.strip().startswith("one-token step"))
    assert "several rows: bf16 activations" in line
    line = next(
        s
        for s in model.set_kernels(batch_bf16=False).describe().splitlines()
        if s.strip().startswith("one-token step")
    )
    assert "kernels.batch_bf16=False" in line
    fp32 = rwkvkit.load(paths[version], dtype=torch.float32).describe()
    assert "several rows: bf16" not in fp32


def test_machine_probe_reads_every_word_once_and_measures_peaks():
    """rwkvkit bench forward's floors: the read probe sums each 64-bit word once, whatever the threads
    and a length that is no multiple of 64 bytes; the peak probes run or say the CPU lacks them (-1)."""
    ext = native._ext()
    words = torch.arange(1, 5003, dtype=torch.int64)
    for threads in (1, 2, 3):
        got = ext.probe(kind=3, iters=0, buf=words.data_ptr(), bytes=words.numel() * 8, threads=threads)
        assert got == float(words.sum())
    tail = torch.arange(1, 20, dtype=torch.uint8)  # 19 bytes: two words, then three bytes alone
    want = sum(int.from_bytes(bytes(tail[i : i + 8].tolist()), "little") for i in (0, 8)) + 17 + 18 + 19
    assert ext.probe(kind=3, iters=0, buf=tail.data_ptr(), bytes=19, threads=1) == float(want)
    for kind in (0, 1, 2):
        r = ext.probe(kind=kind, iters=100, bytes=0, threads=2)
        assert r == -1.0 or r > 0
    assert ext.probe(kind=1, iters=10, bytes=0, threads=1) > 0 or not native.bf16dp()
    with pytest.raises(ValueError, match="kind 0-2"):
        ext.probe(kind=3, iters=0, bytes=64, threads=1)


@pytest.mark.skipif(not native.bf16dp(), reason="the CPU has no AVX512_BF16: the FMA path is the default")
def test_the_fma_fallback_of_cpus_without_avx512_bf16(paths):
    """AVX-512F without AVX512_BF16: the same products as fp32 FMAs (summation order differs only)."""
    x, w = torch.randn(6, 320), (torch.randn(202, 320) / 10).to(torch.bfloat16)
    model = _load(paths[6], "int8")
    tokens = _tokens(5, 3, seed=6)
    dp_y, (dp_logits, _) = native.dense_matmul(x, w, act_bf16=True), _steps(model, tokens)
    try:
        native.configure(kernels.PORTABLE, bf16dp=False)
        assert native._decode_cpu.bf16dp == 0 and native._decode_cpu.avx512 == (not kernels.PORTABLE)
        fma_y, (fma_logits, _) = native.dense_matmul(x, w, act_bf16=True), _steps(model, tokens)
        small, _ = _steps(model, tokens[[4, 1]])
    finally:
        native.configure(kernels.PORTABLE)
    assert native.bf16dp()
    assert (fma_y - dp_y).abs().max().item() <= 1e-5 * dp_y.abs().max().item()
    # another order of sums can move an activation across a bf16 rounding boundary: small, not zero
    assert (fma_logits - dp_logits).abs().max().item() <= 1e-3 * dp_logits.std().item()
    assert torch.equal(fma_logits[[4, 1]], small)  # still independent of the other rows
