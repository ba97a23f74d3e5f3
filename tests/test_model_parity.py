"""rwkvkit against the reference implementation on random checkpoints in the official layout.

Every position of a 64-token sequence must agree to 1e-4 in the logits, whether the sequence runs
whole (chunked parallel WKV), token by token (recurrent step), or is resumed from a saved state;
also for bf16 files, where the reference folds ln0 into the embedding in bf16.
"""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit.state import State
from rwkvkit.testing import random_checkpoint
from tests.reference import load_reference, reference_logits

TOL = 1e-4

# (version, n_layer, n_embd, head_size, vocab, mix_lora, decay_lora)
SHAPES = [
    pytest.param(4, 1, 64, 64, 300, 32, 64, id="v4-L1-C64-V300"),
    pytest.param(4, 3, 96, 96, 65536, 32, 64, id="v4-L3-C96-V65536"),
    # The reference mis-detects a 1-layer v5.2 file (its version check depends on key order), so H=1 uses L=2.
    pytest.param(5, 2, 32, 32, 100, 32, 64, id="v5-L2-H1-V100"),
    pytest.param(5, 2, 64, 32, 300, 32, 64, id="v5-L2-H2-V300"),
    pytest.param(5, 4, 128, 32, 65536, 32, 64, id="v5-L4-H4-V65536"),
    pytest.param(6, 1, 32, 32, 100, 32, 64, id="v6-L1-H1-lora32/64"),
    pytest.param(6, 2, 64, 32, 65536, 32, 64, id="v6-L2-H2-V65536-lora32/64"),
    pytest.param(6, 3, 128, 32, 500, 64, 128, id="v6-L3-H4-lora64/128"),
    pytest.param(6, 4, 96, 32, 1000, 32, 64, id="v6-L4-H3"),
]


def _checkpoint(tmp_path, version, n_layer, n_embd, head_size, vocab, D, Dw, dtype=torch.float32):
    path = tmp_path / f"rwkv{version}.pth"
    random_checkpoint(
        version,
        n_layer,
        n_embd,
        vocab,
        head_size=head_size,
        mix_lora=D,
        decay_lora=Dw,
        dtype=dtype,
        seed=version * 100 + n_layer,
        path=path,
    )
    return path


def _tokens(vocab: int, T: int = 64, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-file", "bf16-file"])
@pytest.mark.parametrize("version,n_layer,n_embd,head_size,vocab,D,Dw", SHAPES)
def test_logits_match_reference(tmp_path, dtype, version, n_layer, n_embd, head_size, vocab, D, Dw):
    path = _checkpoint(tmp_path, version, n_layer, n_embd, head_size, vocab, D, Dw, dtype)
    tokens = _tokens(vocab)
    ref = load_reference(path)
    want, _ = reference_logits(ref, tokens)  # [T, V]

    model = rwkvkit.load(path)
    assert model.config.version == version and model.config.n_layer == n_layer
    assert model.config.vocab_size == vocab and model.config.n_embd == n_embd
    with torch.no_grad():
        whole, _ = model(tokens)  # default: the native C recurrence on CPU (v5/v6), else chunked
        assert whole.shape == (1, 64, vocab) and whole.dtype == torch.float32
        assert (whole[0] - want).abs().max().item() <= TOL
        chunked, _ = model(tokens, backend="chunked")  # the parallel form used for training
        assert (chunked[0] - want).abs().max().item() <= TOL

        state, steps = None, []
        for i, t in enumerate(tokens):  # recurrent form, one token at a time (both step kernels)
            out, state = model([t], state, backend="naive" if i % 2 else "auto")
            steps.append(out[0, 0])
        assert (torch.stack(steps) - want).abs().max().item() <= TOL

        first, state = model(tokens[:23])  # resume from a state saved to a file
        state.save(tmp_path / "s.state")
        resumed = State.load(tmp_path / "s.state")
        rest, _ = model(tokens[23:], resumed)
        got = torch.cat([first[0], rest[0]])
        assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("version", [4, 5, 6])
def test_naive_backend_matches_reference(tmp_path, version):
    path = _checkpoint(tmp_path, version, 2, 64, 32 if version > 4 else 64, 300, 32, 64)
    tokens = _tokens(300, 40, seed=3)
    want, _ = reference_logits(load_reference(path), tokens)
    model = rwkvkit.load(path)
    with torch.no_grad():
        got, _ = model(tokens, backend="naive")
    assert (got[0] - want).abs().max().item() <= TOL


def test_batch_rows_are_independent(tmp_path):
    path = _checkpoint(tmp_path, 6, 2, 64, 32, 300, 32, 64)
    model = rwkvkit.load(path)
    a, b = _tokens(300, 30, seed=5), _tokens(300, 30, seed=6)
    with torch.no_grad():
        both, st = model(torch.tensor([a, b]))
        la, sa = model(a)
        lb, sb = model(b)
    assert (both[0] - la[0]).abs().max() <= 1e-5 and (both[1] - lb[0]).abs().max() <= 1e-5
    stacked = State.stack([sa, sb])
    for k in st.tensors:
        assert torch.allclose(st[k], stacked[k], atol=1e-5)
    assert torch.equal(st.select(1)["att_shift"], st.split()[1]["att_shift"])


def test_time_state_checkpoint_matches_reference(tmp_path):
    path = tmp_path / "tuned.pth"
    random_checkpoint(6, 2, 64, 300, head_size=32, time_state=True, path=path)
    tokens = _tokens(300, 20, seed=7)
    want, _ = reference_logits(load_reference(path), tokens)
    model = rwkvkit.load(path)
    with torch.no_grad():
        got, _ = model(tokens)
    assert (got[0] - want).abs().max().item() <= TOL
    sd = torch.load(path, weights_only=True)
    st = State.from_time_state(sd, model.config)
    assert torch.equal(st["wkv"], model.init_state()["wkv"])
    back = st.to_time_state()
    assert torch.equal(back["blocks.1.att.time_state"], sd["blocks.1.att.time_state"])


@pytest.mark.parametrize("version", [4, 5, 6])
@pytest.mark.parametrize("T", [1, 2, 3, 40])
def test_last_only_gives_the_last_position_and_the_same_state(tmp_path, version, T):
    """``last_only`` skips work (the last block's channel-mix runs on two positions) but not results."""
    path = _checkpoint(tmp_path, version, 3, 64, 32 if version > 4 else 64, 300, 32, 64)
    model = rwkvkit.load(path)
    tokens = torch.tensor([_tokens(300, T, seed=7), _tokens(300, T, seed=8)])
    with torch.no_grad():
        full, st_full = model(tokens)
        last, st_last = model(tokens, last_only=True)
    assert last.shape == (2, 1, 300)
    assert (last[:, 0] - full[:, -1]).abs().max().item() <= 1e-5
    for k in st_full.tensors:
        assert (st_last[k] - st_full[k]).abs().max().item() <= 1e-6, k
