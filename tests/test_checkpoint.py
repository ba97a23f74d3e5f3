"""Loading and saving checkpoints: architecture detection, bad input, dtypes, safety."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

import rwkvkit
from rwkvkit.config import CheckpointError, ModelConfig
from rwkvkit.state import State
from rwkvkit.testing import random_checkpoint


@pytest.fixture
def finch(tmp_path):
    path = tmp_path / "RWKV-x060-test.pth"
    sd = random_checkpoint(6, 2, 64, 300, head_size=32, path=path)
    return path, sd


def test_config_read_from_keys_and_shapes(finch):
    path, sd = finch
    cfg = ModelConfig.from_state_dict(sd)
    assert (cfg.version, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.vocab_size) == (
        6,
        2,
        64,
        2,
        32,
        300,
    )
    assert (cfg.mix_lora, cfg.decay_lora, cfg.ffn_dim) == (32, 64, 224)
    model = rwkvkit.load(path)
    assert model.config == cfg


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_save_load_roundtrip_pth_and_safetensors(tmp_path, version):
    sd = random_checkpoint(version, 2, 64, 300, head_size=32, path=tmp_path / "a.pth")
    model = rwkvkit.load(tmp_path / "a.pth", fold_ln0=False)
    for name in ("b.pth", "b.safetensors"):
        rwkvkit.save(model, tmp_path / name, dtype=torch.float32)
        again = rwkvkit.load(tmp_path / name, fold_ln0=False)
        for k, v in again.state_dict().items():
            assert torch.equal(v, sd[k].reshape(v.shape)), k
    folded = rwkvkit.load(tmp_path / "a.pth")
    with pytest.raises(ValueError, match="fold_ln0=False"):
        rwkvkit.save(folded, tmp_path / "c.pth")
    assert not list(tmp_path.glob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("version", [4, 5, 6, 7])
def test_a_model_is_saved_as_the_file_it_came_from(tmp_path, version):
    """fp16's layer rescaling is undone, int8 matrices are written as the values they multiply by (and
    quantise back to the same int8), and a state-tuned model keeps its time_state."""
    sd = random_checkpoint(
        version, 7, 64, 300, head_size=32, time_state=version != 4, path=tmp_path / "a.pth"
    )
    x = [5, 7, 11]
    m16 = rwkvkit.load(tmp_path / "a.pth", dtype="fp16", fold_ln0=False)
    assert m16.rescale_every and 7 > m16.rescale_every  # layer 6 is halved in memory
    rwkvkit.save(m16, tmp_path / "b.pth", dtype=None)
    back = torch.load(tmp_path / "b.pth", weights_only=True)
    for k in ("blocks.6.att.output.weight", "blocks.6.ffn.value.weight", "blocks.0.ffn.value.weight"):
        torch.testing.assert_close(back[k], sd[k], rtol=1e-3, atol=1e-6, msg=k)  # fp16's precision, not half
    q = rwkvkit.load(tmp_path / "a.pth", quantize="int8", fold_ln0=False)
    rwkvkit.save(q, tmp_path / "c.pth", dtype=None)
    assert not any(
        k.endswith(("weight_int8", ".scale")) for k in torch.load(tmp_path / "c.pth", weights_only=True)
    )
    again = rwkvkit.load(tmp_path / "c.pth", quantize="int8", fold_ln0=False)
    for (n, a), (_, b) in zip(q.named_buffers(), again.named_buffers()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(again(x)[0], q(x)[0])
    if version != 4:
        ts = rwkvkit.load(tmp_path / "a.pth", fold_ln0=False)
        rwkvkit.save(ts, tmp_path / "d.pth", dtype=None)
        kept = torch.load(tmp_path / "d.pth", weights_only=True)
        for i in range(7):
            k = f"blocks.{i}.att.time_state"
            assert torch.equal(kept[k], sd[k].float()), k


def test_truncated_file(tmp_path, finch):
    path, _ = finch
    data = path.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        rwkvkit.load(bad)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        rwkvkit.load(tmp_path / "nope.pth")


def test_missing_key(tmp_path, finch):
    _, sd = finch
    del sd["blocks.1.att.gate.weight"]
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks\.1\.att\.gate\.weight"):
        rwkvkit.load(tmp_path / "m.pth")


def test_misshapen_key(tmp_path, finch):
    _, sd = finch
    sd["blocks.0.ffn.value.weight"] = torch.zeros(64, 100)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.value\.weight.*\(64, 100\)"):
        rwkvkit.load(tmp_path / "m.pth")


def test_unexpected_key(tmp_path, finch):
    _, sd = finch
    sd["blocks.0.att.surprise"] = torch.zeros(3)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(CheckpointError, match="unexpected keys.*surprise"):
        rwkvkit.load(tmp_path / "m.pth")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda sd: sd.pop("blocks.0.att.gate.weight"), "5.0"),  # ln_x without gate
        (lambda sd: sd.__setitem__("blocks.0.att.time_decay", torch.zeros(2)), "5.1"),
        (lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("blocks.0.att.")], "unknown RWKV layout"),
    ],
    ids=["v5.0", "v5.1", "unknown"],
)
def test_unsupported_versions_are_named(tmp_path, edit, match):
    sd = random_checkpoint(5, 2, 64, 300, head_size=32)
    edit(sd)
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=match):
        rwkvkit.load(tmp_path / "x.pth")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch, finch):
    monkeypatch.chdir(tmp_path)
    _, sd = finch
    sd["evil"] = _Exploit()
    torch.save(sd, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refusing"):
        rwkvkit.load(tmp_path / "evil.pth")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError):
        rwkvkit.load(plain)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_token_ids_outside_vocabulary(finch):
    model = rwkvkit.load(finch[0])
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
        model([1, 2, 300])
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="empty"):
        model([])


def test_token_ids_are_taken_as_given_or_refused(finch):
    """Floats and bools are refused, not truncated to ids; NumPy arrays and lists of lists keep their
    [B, T] shape; any integer dtype works."""
    model = rwkvkit.load(finch[0])
    want = model(torch.tensor([[1, 2], [3, 4]]))[0]
    for tokens in (np.array([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]], dtype=np.uint16), [[1, 2], [3, 4]]):
        assert torch.equal(model(tokens)[0], want)
    for bad in ([1.9, 2.2], np.array([1.9, 2.2]), [True, False]):
        with pytest.raises(ValueError, match="must be integers"):
            model(bad)
    with pytest.raises(ValueError, match="integer token ids"):
        model([2**70])


def test_state_of_wrong_model_or_batch(finch, tmp_path):
    model = rwkvkit.load(finch[0])
    other = rwkvkit.load(
        random_checkpoint(6, 3, 64, 300, head_size=32, path=tmp_path / "o.pth") and tmp_path / "o.pth"
    )
    _, st = other([1, 2])
    with pytest.raises(ValueError, match="shape"):
        model([1], st)
    _, st = model(torch.tensor([[1], [2]]))
    with pytest.raises(ValueError, match="batch size 2"):
        model([1], st)
    with pytest.raises(ValueError, match="not an rwkvkit state file"):
        torch.save({"x": torch.zeros(1)}, tmp_path / "bad.state")
        State.load(tmp_path / "bad.state")


def test_state_value_semantics(finch):
    model = rwkvkit.load(finch[0])
    _, st = model([5, 6, 7])
    before = st.clone()
    model([8], st)  # the incoming state is not modified
    for k in st.tensors:
        assert torch.equal(st[k], before[k])
    assert st["wkv"].dtype == torch.float32 and st["wkv"].shape == (2, 1, 2, 32, 32)


def test_mmap_and_weights_stay_in_file_dtype(tmp_path):
    sd = random_checkpoint(6, 2, 64, 300, head_size=32, dtype=torch.bfloat16, path=tmp_path / "b.pth")
    model = rwkvkit.load(tmp_path / "b.pth", dtype=torch.bfloat16)
    assert model.blocks[1].att.key.weight.dtype == torch.bfloat16
    assert model.blocks[1].att.time_decay.dtype == torch.float32  # decays stay fp32
    # the bf16 matrices are used as loaded (no copy): identical values to the file
    assert torch.equal(model.blocks[1].att.key.weight, sd["blocks.1.att.key.weight"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, finch, bad):
    _, sd = finch
    sd["blocks.1.att.key.weight"][3, 4] = bad
    torch.save(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.key\.weight.*NaN/Inf"):
        rwkvkit.load(tmp_path / "nan.pth")


def test_fp16_overflow_is_refused(tmp_path, finch):
    _, sd = finch
    sd["blocks.0.ffn.key.weight"][0, 0] = 1e6  # finite in fp32, Inf in fp16
    torch.save(sd, tmp_path / "big.pth")
    assert rwkvkit.load(tmp_path / "big.pth") is not None
    with pytest.raises(CheckpointError, match="overflows to Inf in fp16"):
        rwkvkit.load(tmp_path / "big.pth", dtype=torch.float16)


def test_random_bytes_and_odd_keys_are_named_as_such(tmp_path, finch):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a PyTorch file") as e:
        rwkvkit.load(junk)
    assert "pickled objects" not in str(e.value)
    _, sd = finch
    sd[7] = torch.zeros(1)
    torch.save(sd, tmp_path / "intkey.pth")
    with pytest.raises(CheckpointError, match="non-string keys"):
        rwkvkit.load(tmp_path / "intkey.pth")


def _state_payload(model) -> dict:
    _, st = model([1, 2, 3])
    return {"format": "rwkvkit-state-1", "version": st.version, **{k: v for k, v in st.tensors.items()}}


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda p: p.pop("version"), "version"),
        (lambda p: p.update(version="6"), "version"),
        (lambda p: p.update(wkv=[1.0, 2.0]), "not a tensor"),
        (lambda p: p.update(wkv=p["wkv"].long()), "floating-point"),
        (lambda p: p.update(ffn_shift=torch.cat([p["ffn_shift"]] * 2, dim=1)), "rows"),
        (lambda p: p.update(att_shift=p["att_shift"][:, :, :5]), "width"),
        (lambda p: p["wkv"].view(-1).__setitem__(7, float("nan")), "NaN"),
        (lambda p: p.update(extra=torch.zeros(1)), "unexpected"),
        (lambda p: p.update({3: torch.zeros(1)}), "unexpected"),
    ],
)
def test_state_files_are_validated_in_full(tmp_path, finch, edit, match):
    payload = _state_payload(rwkvkit.load(finch[0]))
    edit(payload)
    torch.save(payload, tmp_path / "s.state")
    with pytest.raises(ValueError, match=match):
        State.load(tmp_path / "s.state")


def test_state_file_of_random_bytes_or_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.state").write_bytes(os.urandom(2000))
    with pytest.raises(ValueError, match="not a PyTorch file"):
        State.load(tmp_path / "r.state")
    torch.save({"format": "rwkvkit-state-1", "version": _Exploit()}, tmp_path / "e.state")
    with pytest.raises(ValueError, match="pickled objects"):
        State.load(tmp_path / "e.state")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_a_state_that_does_not_fit_the_model_is_refused(finch):
    model = rwkvkit.load(finch[0])
    cfg = model.config
    good = model.init_state(2)
    model(torch.tensor([[1], [2]]), good)  # any batch size fits
    wrong = State(cfg.version, {**good.tensors, "att_shift": torch.zeros(cfg.n_layer, 2, cfg.n_embd + 1)})
    with pytest.raises(
        ValueError, match=rf"state 'att_shift' has shape .*model needs \({cfg.n_layer}, 1, {cfg.n_embd}\)"
    ):
        model(torch.tensor([[1], [2]]), wrong)
    missing = State(cfg.version, {k: v for k, v in good.tensors.items() if k != "ffn_shift"})
    with pytest.raises(ValueError, match="state lacks 'ffn_shift'"):
        model(torch.tensor([[1], [2]]), missing)
    with pytest.raises(ValueError, match="state has batch size 2, input has 1"):
        model([1], good)
