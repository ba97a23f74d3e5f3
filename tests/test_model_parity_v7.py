"""RWKV-7 (Goose) against the reference's x070 class on random checkpoints in the official layout.

As for v4-v6 (``test_model_parity.py``): every position of a 64-token sequence agrees to 1e-4 in the
logits, whole (each WKV backend), token by token and resumed from a saved state, for fp32 and bf16
files; the LoRA widths and head counts vary, and are read from the shapes.
"""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit.config import CheckpointError
from rwkvkit.ops import wkv7_native
from rwkvkit.state import State
from rwkvkit.testing import random_checkpoint
from tests.reference import load_reference_v7, reference_logits, reference_state_from

TOL = 1e-4

# (n_layer, n_embd, head_size, vocab, {lora widths})
SHAPES = [
    pytest.param(1, 32, 32, 100, {}, id="L1-H1-V100"),
    pytest.param(2, 64, 32, 65536, {}, id="L2-H2-V65536"),
    pytest.param(
        3, 128, 32, 500, dict(decay_lora=64, a_lora=32, v_lora=16, gate_lora=96), id="L3-H4-lora64/32/16/96"
    ),
    pytest.param(4, 96, 32, 1000, {}, id="L4-H3"),
    pytest.param(2, 128, 64, 300, dict(decay_lora=32, a_lora=48, v_lora=32, gate_lora=64), id="L2-H2xN64"),
]


def _checkpoint(tmp_path, n_layer, n_embd, head_size, vocab, sizes, dtype=torch.float32, **kw):
    path = tmp_path / "rwkv7.pth"
    random_checkpoint(
        7,
        n_layer,
        n_embd,
        vocab,
        head_size=head_size,
        dtype=dtype,
        seed=700 + n_layer,
        path=path,
        **sizes,
        **kw,
    )
    return path


def _tokens(vocab: int, T: int = 64, seed: int = 1) -> list[int]:
    return torch.randint(0, vocab, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


def _diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-file", "bf16-file"])
@pytest.mark.parametrize("n_layer,n_embd,head_size,vocab,sizes", SHAPES)
def test_logits_match_reference(tmp_path, dtype, n_layer, n_embd, head_size, vocab, sizes):
    path = _checkpoint(tmp_path, n_layer, n_embd, head_size, vocab, sizes, dtype)
    tokens = _tokens(vocab)
    want, _ = reference_logits(load_reference_v7(path), tokens)  # [T, V]

    model = rwkvkit.load(path)
    cfg = model.config
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (7, n_layer, n_embd, vocab)
    assert (cfg.n_head, cfg.head_size, cfg.ffn_dim) == (n_embd // head_size, head_size, 4 * n_embd)
    for name, width in sizes.items():
        assert getattr(cfg, name) == width
    with torch.no_grad():
        whole, _ = model(tokens)  # the native C recurrence on the CPU
        assert whole.shape == (1, 64, vocab) and whole.dtype == torch.float32
        assert _diff(whole[0], want) <= TOL
        for backend in ("chunked", "naive"):
            got, _ = model(tokens, backend=backend)
            assert _diff(got[0], want) <= TOL, backend

        state, steps = None, []
        for i, t in enumerate(tokens):  # one token at a time, both step paths
            out, state = model([t], state, backend="naive" if i % 2 else "auto")
            steps.append(out[0, 0])
        assert _diff(torch.stack(steps), want) <= TOL

        first, state = model(tokens[:23])  # resume from a state saved to a file
        state.save(tmp_path / "s.state")
        resumed = State.load(tmp_path / "s.state")
        assert resumed.version == 7
        rest, _ = model(tokens[23:], resumed, backend="chunked")
        assert _diff(torch.cat([first[0], rest[0]]), want) <= TOL


@pytest.mark.skipif(not wkv7_native.available(), reason="the native WKV-7 kernel is not built")
def test_native_backend_by_name_matches_reference(tmp_path):
    path = _checkpoint(tmp_path, 2, 64, 32, 300, {})
    tokens = _tokens(300, 40, seed=3)
    want, _ = reference_logits(load_reference_v7(path), tokens)
    model = rwkvkit.load(path)
    with torch.no_grad():
        got, _ = model(tokens, backend="native")
        step, _ = model(tokens[:1], backend="native")
    assert _diff(got[0], want) <= TOL
    assert _diff(step[0, 0], want[0]) <= TOL


def test_reference_state_layout_is_ours(tmp_path):
    """The wkv state (value x key) is the reference's: its state after a prompt, handed back, continues
    our sequence and ours continues its (so State files and time_state need no transpose)."""
    path = _checkpoint(tmp_path, 3, 64, 32, 300, {})
    tokens = _tokens(300, 30, seed=4)
    ref = load_reference_v7(path)
    model = rwkvkit.load(path)
    with torch.no_grad():
        _, st = model(tokens[:17])
        want, ref_state = reference_logits(ref, tokens[:17])
        for i in range(3):
            assert _diff(st["wkv"][i, 0], ref_state[3 * i + 1]) <= 1e-5
            assert _diff(st["att_shift"][i, 0], ref_state[3 * i]) <= 1e-5
            assert _diff(st["ffn_shift"][i, 0], ref_state[3 * i + 2]) <= 1e-5
        rest_ref, _ = reference_logits(ref, tokens[17:], reference_state_from(st, model.config))
        rest, _ = model(tokens[17:], st)
    assert _diff(rest[0], rest_ref) <= TOL


def test_time_state_file_matches_reference_started_from_it(tmp_path):
    """A state-tuned file (``blocks.{i}.att.time_state`` [H, N, N], RWKV-PEFT's v7 layout [value, key])
    starts every sequence from that state: the reference given the same state agrees."""
    path = tmp_path / "tuned.pth"
    sd = random_checkpoint(7, 2, 64, 300, head_size=32, time_state=True, path=path, seed=9)
    model = rwkvkit.load(path)
    start = model.init_state()
    for i in range(2):
        assert torch.equal(start["wkv"][i, 0], sd[f"blocks.{i}.att.time_state"])
    tokens = _tokens(300, 20, seed=7)
    want, _ = reference_logits(load_reference_v7(path), tokens, reference_state_from(start, model.config))
    with torch.no_grad():
        got, _ = model(tokens)
    assert _diff(got[0], want) <= TOL
    st = State.from_time_state(sd, model.config)
    assert torch.equal(st["wkv"], start["wkv"])
    assert torch.equal(st.to_time_state()["blocks.1.att.time_state"], sd["blocks.1.att.time_state"])


@pytest.mark.parametrize("T", [1, 2, 3, 40])
def test_last_only_and_batch_rows(tmp_path, T):
    path = _checkpoint(tmp_path, 3, 64, 32, 300, {})
    model = rwkvkit.load(path)
    tokens = torch.tensor([_tokens(300, T, seed=7), _tokens(300, T, seed=8)])
    with torch.no_grad():
        full, st_full = model(tokens)
        last, st_last = model(tokens, last_only=True)
        one, st_one = model(tokens[1:])
    assert last.shape == (2, 1, 300)
    assert _diff(last[:, 0], full[:, -1]) <= 1e-5
    assert _diff(one[0], full[1]) <= 1e-5
    for k in st_full.tensors:
        assert _diff(st_last[k], st_full[k]) <= 1e-6, k
        assert _diff(st_one[k][:, 0], st_full[k][:, 1]) <= 1e-5, k


def test_unfused_pytorch_path_matches(tmp_path):
    """With the fused kernels switched off the PyTorch modules alone give the same logits."""
    path = _checkpoint(tmp_path, 2, 64, 32, 300, {})
    model = rwkvkit.load(path)
    tokens = _tokens(300, 20, seed=2)
    with torch.no_grad():
        fused_out, _ = model(tokens)
        model.set_kernels(fused=False)
        plain, _ = model(tokens)
    assert _diff(fused_out, plain) <= 1e-5


def test_block0_value_lora_is_in_the_file_but_not_trained(tmp_path):
    path = _checkpoint(tmp_path, 2, 64, 32, 300, {})
    model = rwkvkit.load(path, fold_ln0=False)
    att0, att1 = model.blocks[0].att, model.blocks[1].att
    params = dict(model.named_parameters())
    assert "blocks.0.att.v1" not in params and "blocks.1.att.v1" in params
    assert torch.equal(att0.v1, torch.load(path, weights_only=True)["blocks.0.att.v1"])
    assert set(model.state_dict()) == set(torch.load(path, weights_only=True))
    assert att1.v1.requires_grad and not att0.v1.requires_grad


def test_deep_embed_and_broken_files_are_refused(tmp_path):
    sd = random_checkpoint(7, 2, 64, 300, head_size=32)
    deep = dict(sd)
    deep["blocks.0.ffn.s_emb.weight"] = torch.zeros(300, 1024)
    deep["blocks.0.ffn.s0"] = torch.zeros(256)
    torch.save(deep, tmp_path / "de.pth")
    with pytest.raises(CheckpointError, match="DeepEmbed.*blocks.0.ffn.s0"):
        rwkvkit.load(tmp_path / "de.pth")
    bad = dict(sd)
    bad["blocks.1.att.a2"] = torch.zeros(16, 64)  # a_lora read from block 0's a1 (32 wide by default)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="blocks.1.att.a2"):
        rwkvkit.load(tmp_path / "bad.pth")
    no_rk = {k: v for k, v in sd.items() if k != "blocks.1.att.r_k"}
    torch.save(no_rk, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing keys.*blocks.1.att.r_k"):
        rwkvkit.load(tmp_path / "missing.pth")
    odd = dict(sd)
    odd["blocks.0.att.r_k"] = torch.zeros(3, 32)
    torch.save(odd, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="r_k"):
        rwkvkit.load(tmp_path / "odd.pth")
