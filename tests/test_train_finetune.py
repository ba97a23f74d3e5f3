"""Fine-tuning changes only what it should: LoRA only its adapters (merged back into the targeted
matrices at export), state tuning only the initial state (exported as time_state / State files that
rwkvkit and the ``rwkv`` package load)."""

from __future__ import annotations

import pytest
import torch

import rwkvkit
from rwkvkit.config import ModelConfig
from rwkvkit.state import State
from rwkvkit.testing import random_checkpoint
from rwkvkit.train.lora import LoRALinear, add_lora, lora_state_dict, merge_lora
from rwkvkit.train.trainer import Trainer
from tests.reference import load_reference, reference_logits, reference_state_from

from .test_train_helpers import TINY_SIZES, V, tiny_config


@pytest.fixture(params=[6, 7], ids=["finch", "goose"])
def base_ckpt(tmp_path, request):
    path = tmp_path / "base.pth"
    sizes = TINY_SIZES[request.param]
    sd = random_checkpoint(request.param, 2, 64, V, head_size=32, seed=1, dtype=torch.bfloat16, **sizes)
    torch.save(sd, path)
    return path, sd


def test_lora_trains_only_adapters_and_merges_into_targets(tmp_path, base_ckpt):
    path, base = base_ckpt
    targets = ["att.key", "att.value", "ffn.key"]
    cfg = tiny_config(
        tmp_path, mode="lora", load=str(path), lora_targets=targets, lora_r=4, max_steps=4, lr_init=2e-2
    )
    tr = Trainer(cfg)
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    tr.fit()
    merged = torch.load(tmp_path / "run" / "rwkv-final.pth", weights_only=True)
    assert merged.keys() == base.keys()  # an official checkpoint, no adapter keys
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed, "LoRA changed nothing"
    assert all(any(k.endswith(f"{t}.weight") for t in targets) for k in changed), changed
    rwkvkit.load(tmp_path / "run" / "rwkv-final.pth")


def test_lora_merge_keeps_the_function():
    cfg = ModelConfig(6, 2, 64, V, head_size=32, mix_lora=8, decay_lora=16)
    from rwkvkit.models import RWKV

    torch.manual_seed(0)
    model = RWKV(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    add_lora(model, r=4, alpha=8, targets=["att.receptance", "ffn.value"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.1)
    assert len(lora_state_dict(model)) == 2 * 2 * 3
    tokens = torch.randint(0, V, (2, 20))
    before, _ = model(tokens)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    after, _ = model(tokens)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert "blocks.0.att.receptance.weight" in model.state_dict()


def test_lora_rejects_unknown_targets():
    from rwkvkit.models import RWKV

    with pytest.raises(ValueError, match="no nn.Linear matches"):
        add_lora(
            RWKV(ModelConfig(6, 1, 64, V, head_size=32, mix_lora=8, decay_lora=16)), targets=["att.nothing"]
        )


def test_state_tuning_changes_only_the_state_and_exports_it(tmp_path, base_ckpt):
    path, base = base_ckpt
    cfg = tiny_config(
        tmp_path, mode="state", load=str(path), max_steps=8, lr_init=0.1, lr_final=0.1, eval_every=8
    )
    tr = Trainer(cfg)
    before = {k: v.detach().clone() for k, v in tr.base.state_dict().items()}
    loss0 = tr.evaluate()
    out = tr.fit()
    assert all(torch.equal(before[k], v) for k, v in tr.base.state_dict().items())  # model untouched
    assert out["val_loss"] < loss0  # the learned initial state helps on this data
    spath = tmp_path / "run" / "state-final.pth"
    assert spath == out["checkpoint"] and spath.with_suffix(".state").is_file()
    ts = torch.load(spath, weights_only=True)
    assert sorted(ts) == [f"blocks.{i}.att.time_state" for i in range(2)]
    assert (
        ts["blocks.0.att.time_state"].shape == (2, 32, 32) and ts["blocks.0.att.time_state"].abs().sum() > 0
    )
    config = ModelConfig.from_state_dict(base)
    st = State.from_time_state(ts, config)
    st2 = State.load(spath.with_suffix(".state"))
    torch.testing.assert_close(st2.tensors["wkv"], st.tensors["wkv"])
    # base + time_state in one file: rwkvkit and the rwkv package start from the tuned state alike
    both = tmp_path / "tuned.pth"
    torch.save({**base, **{k: v.to(torch.bfloat16) for k, v in ts.items()}}, both)
    m = rwkvkit.load(both)
    tokens = [3, 9, 27, 5, 0, 12]
    ours, _ = m(tokens)
    ours_explicit, _ = rwkvkit.load(path)(
        tokens, State.from_time_state({k: v.to(torch.bfloat16) for k, v in ts.items()}, config)
    )
    torch.testing.assert_close(ours, ours_explicit)
    if config.version == 7:  # the reference's x070 class reads no time_state: hand it the state
        start = State.from_time_state({k: v.to(torch.bfloat16) for k, v in ts.items()}, config)
        start = reference_state_from(start, config)
        ref, _ = reference_logits(load_reference(both), tokens, start)
    else:  # its v5/v6 classes start from the file's time_state themselves
        ref, _ = reference_logits(load_reference(both), tokens)
    assert (ours[0] - ref).abs().max().item() < 1e-4


def test_state_tuning_refuses_rwkv4(tmp_path):
    path = tmp_path / "v4.pth"
    random_checkpoint(4, 1, 64, V, path=path)
    with pytest.raises(ValueError, match="Eagle .v5. or Finch"):
        Trainer(tiny_config(tmp_path, version=4, mode="state", load=str(path)))


def _vocab(path, size: int):
    from rwkvkit.train.vocab import subset_vocab, write_vocab

    write_vocab(subset_vocab(["the cat sat on the mat. " * 40], size), path)
    return path


def test_fine_tuning_refuses_a_vocabulary_larger_than_the_model(tmp_path, base_ckpt, capsys):
    from rwkvkit.train.cli import main

    path, _ = base_ckpt
    vocab = _vocab(tmp_path / "big.txt", 300)  # the model has 64 ids
    cfg = tiny_config(tmp_path, load=str(path), vocab=str(vocab), max_steps=1)
    args = [f"data={cfg.data}", f"out_dir={cfg.out_dir}", f"load={path}", f"vocab={vocab}", "device=cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"rwkvkit train: vocabulary file '{vocab}' has 300 ids, more than the {V} of the model in "
        f"'{path}': fine-tune with the vocabulary it was trained with"
    )
    assert not (tmp_path / "run" / "vocab.txt").exists()


def test_a_full_fine_tune_carries_the_base_models_vocabulary(tmp_path, capsys):
    from rwkvkit.run_cli import generate_main

    base = tmp_path / "base" / "model.pth"
    base.parent.mkdir()
    random_checkpoint(6, 1, 32, 300, head_size=32, mix_lora=4, decay_lora=8, path=base)
    vocab = _vocab(tmp_path / "base" / "model.vocab.txt", 300)  # as find_vocab looks beside a model
    cfg = tiny_config(tmp_path, load=str(base), max_steps=1, ctx_len=16)
    out = Trainer(cfg).fit()
    assert (tmp_path / "run" / "vocab.txt").read_bytes() == vocab.read_bytes()
    capsys.readouterr()
    assert generate_main(["--model", str(out["checkpoint"]), "--prompt", "the cat", "--max-tokens", "2"]) == 0
