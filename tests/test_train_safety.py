"""A training run folder is never destroyed or trusted by accident: no code runs from train_state.pt,
no run is overwritten without asking, resumes say what they do, and config mistakes are one line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvkit.train.cli import main
from rwkvkit.train.config import field_help
from rwkvkit.train.trainer import Trainer

from .test_train_helpers import model_overrides, tiny_config

FAST = dict(n_layer=1, n_embd=32, head_size=32, mix_lora=4, decay_lora=8, ctx_len=16, max_steps=3)


def _cli_args(cfg, *extra: str) -> list[str]:
    keys = ("data", "out_dir", "ctx_len", "max_steps", "warmup_steps", "threads", "device", "save_every",
            "eval_every")  # fmt: skip
    return [f"{k}={getattr(cfg, k)}" for k in keys] + model_overrides(cfg) + ["progress=false", *extra]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_RESUME",))


def test_resume_never_unpickles_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, **FAST)
    Trainer(cfg).fit()
    state = Path(cfg.out_dir) / "train_state.pt"
    payload = torch.load(state, weights_only=True)  # what the trainer writes loads without pickled code
    payload["optimizer"]["evil"] = _Exploit()
    torch.save(payload, state)
    with pytest.raises(ValueError, match="pickled objects"):
        Trainer(cfg).fit(resume=True)
    assert not (tmp_path / "PWNED_BY_RESUME").exists()


def test_a_run_is_not_overwritten_without_asking(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_config(tmp_path, **FAST)
    assert main(_cli_args(cfg)) == 0
    out = Path(cfg.out_dir)
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(_cli_args(cfg)) == 2  # same folder, no --resume: refused, nothing touched
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == metrics
    (out / "rwkv-99.pth").write_bytes(b"old run's checkpoint")
    assert main(_cli_args(cfg, "--overwrite")) == 0
    assert not (out / "rwkv-99.pth").exists() and "removed" in capsys.readouterr().err
    assert main(_cli_args(cfg, "--resume", "--overwrite")) == 2


def test_resume_without_state_and_resume_messages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tiny_config(tmp_path, **FAST)
    assert main(_cli_args(cfg, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(_cli_args(cfg, "stop_at_step=2")) == 0
    capsys.readouterr()
    out = Path(cfg.out_dir)
    (out / "rwkv-2.pth.abc123.tmp").write_bytes(b"half a checkpoint")  # a write killed half-way
    # overrides after --resume are accepted; a changed lr is named, an unchanged run is not
    assert main(["--resume", *_cli_args(cfg), "lr_init=0.002"]) == 0
    err = capsys.readouterr().err
    assert "resuming from step 2 of 3" in err and "lr_init 0.0006 -> 0.002" in err
    assert not list(out.glob("*.tmp"))
    # a changed architecture cannot resume
    assert main(_cli_args(cfg, "--resume", "model.n_layer=2")) == 2
    assert "model.n_layer 1 -> 2" in capsys.readouterr().err
    assert main(_cli_args(cfg, "--resume", "model.version=7", "model.mix_lora=0")) == 2  # not a v7 size
    assert "model.mix_lora is not a size of Goose (RWKV-7)" in capsys.readouterr().err


def test_a_run_saved_with_the_flat_config_layout_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """train_state.pt of a run from before the model section (flat version, n_layer, ..., Finch's LoRA
    widths for every version): the same model resumes, a changed one is refused by name."""
    cfg = tiny_config(tmp_path, stop_at_step=2, **FAST)
    Trainer(cfg).fit()
    state = Path(cfg.out_dir) / "train_state.pt"
    payload = torch.load(state, weights_only=True)
    flat = {k: v for k, v in payload["config"].items() if k != "model"}
    payload["config"] = flat | {k: v for k, v in payload["config"]["model"].items()}
    assert payload["config"]["version"] == 6 and payload["config"]["mix_lora"] == 4
    torch.save(payload, state)
    capsys.readouterr()
    assert main(_cli_args(cfg, "--resume", "model.n_embd=64")) == 2
    assert "model.n_embd 32 -> 64" in capsys.readouterr().err
    assert main(_cli_args(cfg, "--resume")) == 0
    assert "resuming from step 2" in capsys.readouterr().err


def test_resume_exports_the_checkpoint_a_kill_skipped(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, stop_at_step=2, **FAST)
    Trainer(cfg).fit()
    ckpt = Path(cfg.out_dir) / "rwkv-2.pth"
    want = torch.load(ckpt, weights_only=True)
    ckpt.unlink()  # killed after train_state.pt was saved, before rwkv-2.pth was written
    cfg.stop_at_step = 0
    tr = Trainer(cfg)
    assert tr.prepare(resume=True) and ckpt.is_file()
    got = torch.load(ckpt, weights_only=True)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_keep_last_checkpoints(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, save_every=1, keep_last=2, **{**FAST, "max_steps": 5})
    Trainer(cfg).fit()
    names = sorted(p.name for p in Path(cfg.out_dir).glob("rwkv-*.pth"))
    assert names == ["rwkv-4.pth", "rwkv-5.pth", "rwkv-final.pth"]


def test_trained_model_is_usable_with_its_vocabulary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rwkvkit.run_cli import generate_main
    from rwkvkit.train.vocab import subset_vocab, write_vocab

    write_vocab(subset_vocab(["the cat sat on the mat. " * 40], 300), tmp_path / "v.txt")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "tokens.npy", rng.integers(0, 300, size=3000).astype(np.uint16))
    cfg = tiny_config(tmp_path, vocab=str(tmp_path / "v.txt"), vocab_size=0, **FAST)
    out = Trainer(cfg).fit()
    run = Path(cfg.out_dir)
    assert (run / "vocab.txt").read_bytes() == (tmp_path / "v.txt").read_bytes()
    capsys.readouterr()
    assert generate_main(["--model", str(out["checkpoint"]), "--prompt", "the cat", "--max-tokens", "3"]) == 0


@pytest.mark.parametrize(
    "extra,match",
    [
        (["data=/nonexistent/tokens.npy"], "token file '/nonexistent/tokens.npy' not found"),
        (["vocab=/nonexistent/vocab.txt", "model.vocab_size=0"], "cannot read vocabulary file"),
        (["device=cuda"], "CUDA is not available"),
        (["model.n_embd=48"], "not a multiple of head_size"),
        (["model.vocab_size=8"], "token id .* outside the model's vocabulary of 8"),
        (["n_layer=2"], "model options go in the model section now: n_layer .*model.n_layer=2"),
        (["model.n_layers=3"], "unknown model option model.n_layers"),
        (["model.version=9"], "unsupported RWKV version 9"),
        (["ctx_len=100000"], "too little training data|fewer than ctx_len"),
        (["n_layers=3"], "unknown training option"),
        (["lr_init=[1"], "not valid YAML"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, extra, match) -> None:
    if extra == ["device=cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    cfg = tiny_config(tmp_path, **FAST)
    assert main(_cli_args(cfg, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("rwkvkit train: ")
    import re

    assert re.search(match, err), err


def test_bad_yaml_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("model: {n_layer: 2}\nlr_init: [0.1\n")
    assert main(["--config", str(y)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and str(y) in err and len(err.splitlines()) == 1
    assert main(["--config", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_help_describes_every_key(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, (_, comment) in field_help().items():
        assert comment, f"TrainConfig.{name} has no comment to show in --help"
        assert f"{name} [" in text and " ".join(comment.split()) in text, name


def test_trainer_tunes_malloc_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rwkvkit.runtime

    calls = []
    monkeypatch.setattr(rwkvkit.runtime, "tune_malloc", lambda *a, **k: calls.append(1) or True)
    Trainer(tiny_config(tmp_path, **FAST))
    assert calls
