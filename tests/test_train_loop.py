"""The training loop end to end on tiny models: the loss falls, checkpoints are official files that
the ``rwkv`` package reads with the same logits, and a killed run resumes to the same parameters."""

from __future__ import annotations

import json

import pytest
import torch

import rwkvkit
from rwkvkit.train.trainer import Trainer

from .test_train_helpers import tiny_config


@pytest.mark.parametrize("version", [6, 5, 4, 7])
def test_loss_falls_on_tiny_data(tmp_path, version):
    cfg = tiny_config(tmp_path, version=version, max_steps=25, lr_init=1e-2, lr_final=1e-3, eval_every=25)
    out = Trainer(cfg).fit()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = recs[0]["loss"], sum(r["loss"] for r in recs[-3:]) / 3
    assert first > 3.5  # ~log(64) at init
    assert last < first - 1.0, (first, last)
    assert out["val_loss"] is not None and out["val_loss"] < first - 1.0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def _rwkv_package_logits(path, tokens):
    from tests.reference import load_reference, reference_logits

    return reference_logits(load_reference(path), tokens)[0]


@pytest.mark.parametrize("version", [6, 5, 4, 7])
def test_checkpoint_is_official_and_matches_rwkv_package(tmp_path, version):
    cfg = tiny_config(tmp_path, version=version, max_steps=3, save_every=2)
    out = Trainer(cfg).fit()
    path = out["checkpoint"]
    assert path.name == "rwkv-final.pth" and (tmp_path / "run" / "rwkv-2.pth").is_file()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert not list((tmp_path / "run").glob("*.tmp*"))  # atomic writes leave nothing behind
    tokens = [1, 5, 9, 0, 33, 2, 63, 7, 7, 7, 12]
    ours, _ = rwkvkit.load(path)(tokens)
    ref = _rwkv_package_logits(path, tokens)
    assert (ours[0] - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("version", [6, 7])
def test_kill_and_resume_reaches_the_same_parameters(tmp_path, version):
    common = dict(
        max_steps=6, warmup_steps=2, lr_schedule="cosine", accum_steps=2, eval_every=3, chunk_len=16,
        version=version,
    )  # fmt: skip
    a = tiny_config(tmp_path / "a", **common)
    Trainer(a).fit()
    b = tiny_config(tmp_path / "b", stop_at_step=3, save_every=100, **common)
    first = Trainer(b).fit()
    assert first["stopped"] == "stop_at_step" and first["step"] == 3
    b.stop_at_step = 0
    second = Trainer(b).fit(resume=True)
    assert second["resumed"] and second["step"] == 6
    sa = torch.load(tmp_path / "a" / "run" / "train_state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "run" / "train_state.pt", weights_only=True)
    for k, v in sa["model"].items():
        torch.testing.assert_close(sb["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lb) == 6 and lb == pytest.approx(la, rel=1e-5)


@pytest.mark.parametrize("version", [6, 7])
def test_chunked_context_and_grad_checkpointing_give_the_same_first_step(tmp_path, version):
    """chunk_len cuts gradients between chunks, so only the first step's loss (before any update)
    must equal the whole-context one; checkpointing must not change anything (Goose: the value
    residual that layer 0 hands the later layers survives their recomputation)."""
    whole = Trainer(tiny_config(tmp_path / "w", max_steps=1, version=version))
    chunked = Trainer(tiny_config(tmp_path / "c", max_steps=1, chunk_len=8, version=version))
    ckpt = Trainer(tiny_config(tmp_path / "g", max_steps=2, grad_checkpoint=True, version=version))
    plain = Trainer(tiny_config(tmp_path / "p", max_steps=2, version=version))
    lw, _ = whole.optimizer_step()
    lc, _ = chunked.optimizer_step()
    assert lc == pytest.approx(lw, rel=1e-5)
    for _ in range(2):
        lg, ng = ckpt.optimizer_step()
        lp, np_ = plain.optimizer_step()
        assert lg == pytest.approx(lp, rel=1e-5) and ng == pytest.approx(np_, rel=1e-4)


def test_cli_runs_from_yaml_with_overrides(tmp_path, capsys):
    from rwkvkit.train.cli import main

    cfg = tiny_config(tmp_path)
    y = tmp_path / "c.yaml"
    y.write_text(
        f"data: {cfg.data}\nmodel:\n  n_layer: 1\n  n_embd: 32\n  head_size: 32\n  vocab_size: 64\n"
        "  mix_lora: 4\n  decay_lora: 8\n"
    )
    rc = main(
        [
            "--config",
            str(y),
            "--out-dir",
            str(tmp_path / "o"),
            "max_steps=2",
            "warmup_steps=1",
            "ctx_len=16",
            "progress=false",
            "--set",
            "threads=1",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and (tmp_path / "o" / "rwkv-final.pth").is_file()
    assert main(["--config", str(y), "n_layers=3"]) == 2
