"""The version registry: what each version declares is what its modules and files have.

For every registered version: the checkpoint layout the version declares equals the model's own
parameter names and shapes (so loading is load_state_dict), the declared matrices are the ones kept
in the model dtype, the declared state is what ``State.zeros`` builds and the model carries, and the
config's version-specific sizes behave as documented.
"""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit.config import CheckpointError, ModelConfig, checkpoint_keys
from rwkvkit.models import RWKV, registry
from rwkvkit.state import State
from rwkvkit.testing import random_checkpoint

VERSIONS = list(registry.VERSIONS)


@pytest.mark.parametrize("version", VERSIONS)
def test_declared_layout_is_the_models_parameters(version):
    cfg = ModelConfig(version, 2, 64, 100, head_size=32)
    with torch.device("meta"):
        model = RWKV(cfg)
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keys = checkpoint_keys(cfg)
    assert set(params) == set(keys)
    for k, shape in keys.items():  # the file's [1, 1, C] mixes are stored as they come: same numel
        assert torch.Size(params[k]).numel() == torch.Size(shape).numel(), k
    assert ModelConfig.from_state_dict(random_checkpoint(version, 2, 64, 100, head_size=32)) == cfg


@pytest.mark.parametrize("version", VERSIONS)
def test_declared_matrices_take_the_model_dtype(tmp_path, version):
    path = tmp_path / "m.pth"
    random_checkpoint(version, 2, 64, 100, head_size=32, path=path)
    model = rwkvkit.load(path, dtype=torch.bfloat16, fold_ln0=False)
    spec = model.config.spec
    for name, p in model.state_dict().items():
        want = torch.bfloat16 if spec.is_matrix(name) else torch.float32
        assert p.dtype == want, name
    assert spec.is_matrix("emb.weight") and spec.is_matrix("head.weight")
    assert not spec.is_matrix("blocks.0.ln1.weight") and not spec.is_matrix("blocks.0.att.time_decay")


@pytest.mark.parametrize("version", VERSIONS)
def test_declared_state_is_what_the_model_carries(tmp_path, version):
    path = tmp_path / "m.pth"
    random_checkpoint(version, 2, 64, 100, head_size=32, path=path)
    model = rwkvkit.load(path)
    spec = model.config.spec
    zero = State.zeros(model.config, 3)
    assert set(zero.tensors) == set(spec.state_names())
    for slot in spec.recurrent:
        t = zero[slot.name]
        assert t.dtype == torch.float32 and tuple(t.shape) == (2, 3, *slot.shape(model.config))
        assert torch.all(t == slot.fill)
    _, st = model([1, 2, 3])
    assert set(st.tensors) == set(spec.state_names()) and st.version == version
    st.save(tmp_path / "s.state")
    back = State.load(tmp_path / "s.state")
    assert all(torch.equal(back[k], st[k]) for k in spec.state_names())


def test_rwkv4_starts_its_running_maximum_at_minus_1e30():
    st = State.zeros(ModelConfig(4, 1, 8, 10), 1)
    assert torch.all(st["pp"] == -1e30) and torch.all(st["aa"] == 0)


def test_version_sizes():
    cfg = ModelConfig(6, 2, 64, 100, head_size=32, mix_lora=8)
    assert (cfg.mix_lora, cfg.decay_lora) == (8, 64)  # the missing one takes Finch's default
    assert dict(cfg.sizes) == {"mix_lora": 8, "decay_lora": 64}
    eagle = ModelConfig(5, 2, 64, 100, head_size=32, mix_lora=8)  # another version's size: ignored
    assert eagle == ModelConfig(5, 2, 64, 100, head_size=32) and not eagle.sizes
    with pytest.raises(AttributeError):
        _ = eagle.mix_lora
    with pytest.raises(TypeError, match="unknown sizes.*mix_lorra"):
        ModelConfig(6, 2, 64, 100, mix_lorra=8)
    with pytest.raises(ValueError, match="unsupported RWKV version 9"):
        ModelConfig(9, 2, 64, 100)
    assert ModelConfig(4, 2, 64, 100, head_size=32).head_size == 64  # RWKV-4 has no heads
    assert (
        ModelConfig(4, 2, 64, 100).ffn_dim == 256 and ModelConfig(6, 2, 64, 100, head_size=32).ffn_dim == 224
    )


def test_goose_lora_widths_default_to_rwkv_lms_suggestion():
    """RWKV-LM's max(32, round(s * C^p / 32) * 32), as in the released x070 files (0.1B, 1.5B)."""
    small, large = ModelConfig(7, 12, 768, 100), ModelConfig(7, 24, 2048, 100)
    assert dict(small.sizes) == {"decay_lora": 64, "a_lora": 64, "v_lora": 32, "gate_lora": 128}
    assert dict(large.sizes) == {"decay_lora": 96, "a_lora": 96, "v_lora": 64, "gate_lora": 256}
    assert dict(ModelConfig(7, 2, 64, 100, head_size=32, a_lora=8).sizes) == {
        "decay_lora": 32, "a_lora": 8, "v_lora": 32, "gate_lora": 32,
    }  # fmt: skip
    assert small.ffn_dim == 4 * 768 and small.n_head == 12


def test_each_layout_is_claimed_by_exactly_one_version():
    for version in VERSIONS:
        sd = random_checkpoint(version, 1, 64, 50, head_size=32)
        assert [s.version for s in registry.VERSIONS.values() if s.detect(sd)] == [version]
    with pytest.raises(CheckpointError, match="unknown RWKV layout"):
        registry.detect({"blocks.0.att.foo": torch.zeros(1)})


def test_learning_rate_multipliers_come_from_the_versions():
    assert registry.lr_multiplier("blocks.3.att.time_decay") == 2.0
    assert registry.lr_multiplier("module.blocks.0.att.time_faaaa") == 3.0
    assert registry.lr_multiplier("blocks.0.att.time_first") == 3.0
    assert registry.lr_multiplier("blocks.0.att.key.weight") == 1.0
    assert registry.lr_multiplier("blocks.2.att.w0") == 2.0  # Goose: the decay's base at 2x
    assert registry.lr_multiplier("blocks.2.att.w1") == 1.0


def test_state_rows_are_copies_and_bad_rows_or_shapes_are_named():
    cfg = ModelConfig(6, 2, 64, 100, head_size=32)
    st = State.zeros(cfg, 3)
    st["att_shift"][:, 2] = 7.0
    last = st.select(-1)
    assert torch.equal(last["att_shift"], st["att_shift"][:, 2:3])
    part = st.select(slice(1, 3))
    part["att_shift"].zero_()  # a copy: the parent keeps its rows
    assert st["att_shift"][:, 2].eq(7).all() and part.batch_size == 2
    with pytest.raises(IndexError, match="row 3 is outside this state's batch of 3"):
        st.select(3)
    with pytest.raises(IndexError, match="row -4"):
        st.select([0, -4])
    other = State.zeros(ModelConfig(6, 2, 128, 100, head_size=32), 1)
    with pytest.raises(ValueError, match="different models"):
        State.stack([st, other])
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            State.zeros(cfg, bad)
