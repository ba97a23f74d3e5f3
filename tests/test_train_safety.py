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
        (["lr_init=inf"], "lr_init must be a positive number, got inf"),
        (["lr_init=1e9"], "lr_init 1e\\+09 is above 1: far too large for Adam"),
        (["log_every=0"], "log_every must be positive, got 0"),
        (["model.ffn_dim=-4"], "model.ffn_dim must be >= 0, got -4"),
        (["backend=native"], r"backend must be one of \('auto', 'chunked', 'naive'\) to train"),
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


def _poison_gradients_from(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """From optimiser step ``step`` on (1-based), a NaN in one gradient after the backward pass, with the
    loss still finite: what a learning rate far too high does a step before the loss goes NaN."""
    train_micro = Trainer.train_micro

    def poisoned(self, *args, **kwargs):
        loss = train_micro(self, *args, **kwargs)
        if self.step + 1 >= step:
            self.params[0].grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(Trainer, "train_micro", poisoned)


def _all_finite(path: Path) -> bool:
    sd = torch.load(path, weights_only=True)
    sd = sd.get("model", sd) if path.name == "train_state.pt" else sd
    return all(torch.isfinite(v.float()).all() for v in sd.values())


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_a_non_finite_gradient_stops_before_the_optimiser_step(tmp_path: Path, grad_clip: float) -> None:
    tr = Trainer(tiny_config(tmp_path, grad_clip=grad_clip, **FAST))
    tr.optimizer_step()
    before = {k: v.detach().clone() for k, v in tr.base.state_dict().items()}
    tr.params[0].register_hook(lambda g: g * float("nan"))
    with pytest.raises(FloatingPointError, match=r"diverged at step 2: loss \d.*, gradient norm nan"):
        tr.optimizer_step()
    assert tr.step == 1 and all(p.grad is None for p in tr.params)
    assert all(torch.equal(before[k], v) for k, v in tr.base.state_dict().items())  # weights untouched


def test_a_diverging_run_saves_nothing_non_finite(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, **{**FAST, "max_steps": 6})
    _poison_gradients_from(3, monkeypatch)
    assert main(_cli_args(cfg, "save_every=2")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("rwkvkit train: training diverged at step 3: loss ") and "gradient norm nan" in err
    out = Path(cfg.out_dir)
    assert "lower lr_init (now 0.0006)" in err and f"the last good checkpoint is {out / 'rwkv-2.pth'}" in err
    assert sorted(p.name for p in out.glob("*.pth")) == ["rwkv-2.pth"]
    assert _all_finite(out / "rwkv-2.pth") and _all_finite(out / "train_state.pt")
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2


def test_a_run_that_fails_at_its_first_step_leaves_the_folder_reusable(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path, **FAST)
    with monkeypatch.context() as m:
        _poison_gradients_from(1, m)
        assert main(_cli_args(cfg)) == 1
    err = capsys.readouterr().err
    assert "diverged at step 1" in err and "no checkpoint was saved" in err
    out = Path(cfg.out_dir)
    assert (out / "metrics.jsonl").is_file() and not list(out.glob("*.pt*"))  # a log, nothing saved
    assert main(_cli_args(cfg, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(_cli_args(cfg)) == 0  # a fresh start takes the folder: it held no run
    assert (out / "rwkv-final.pth").is_file()


@pytest.mark.parametrize("where", ["tail", "val_data"])
def test_out_of_vocabulary_ids_in_the_validation_data_are_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture, where: str
) -> None:
    cfg = tiny_config(tmp_path, **FAST)
    tokens = np.load(cfg.data).astype(np.int64)  # int64: any id fits
    if where == "tail":  # in the last val_fraction, which the training part never reads
        tokens[-5] = 64
        np.save(tmp_path / "bad.npy", tokens)
        extra, name, pos = ["data=" + str(tmp_path / "bad.npy")], "token file", len(tokens) - 5
    else:
        np.save(tmp_path / "val.npy", np.r_[tokens[:500], 70, tokens[:500]])
        extra, name, pos = ["val_data=" + str(tmp_path / "val.npy")], "validation token file", 500
    assert main(_cli_args(cfg, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"rwkvkit train: {name} '{tmp_path}/"), err
    assert f"holds token id {tokens[-5] if where == 'tail' else 70} at position {pos}" in err
    assert not any(Path(cfg.out_dir).iterdir())  # refused before step 1: nothing written


def test_overwrite_removes_only_the_trainers_files_and_never_the_loaded_model(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = tiny_config(tmp_path, **FAST)
    assert main(_cli_args(cfg, "save_every=2")) == 0
    out = Path(cfg.out_dir)
    (out / "rwkv-best.pth").write_bytes(b"the user's pick")
    capsys.readouterr()
    # fine-tuning the run's own checkpoint into its folder: --overwrite would delete the model it loads
    ft = _cli_args(cfg, "mode=state", f"load={out / 'rwkv-2.pth'}", "--overwrite")
    assert main(ft) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"rwkvkit train: --overwrite would delete {out / 'rwkv-2.pth'}, the checkpoint this run loads from: "
        f"copy it out of {out} first, or pick another out_dir"
    )
    assert (out / "rwkv-2.pth").is_file() and (out / "train_state.pt").is_file()
    assert main(_cli_args(cfg, "--overwrite")) == 0
    assert "removed 6 files" in capsys.readouterr().err  # rwkv-2, -3, -final, train_state, log, plot
    assert (out / "rwkv-best.pth").read_bytes() == b"the user's pick"


def test_a_resume_refused_for_a_changed_mode_names_only_real_differences(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A fine-tuning config leaves the model section at its defaults (the loaded checkpoint decides):
    its sizes are no difference from the pretraining run's."""
    cfg = tiny_config(tmp_path, stop_at_step=2, **FAST)
    Trainer(cfg).fit()
    out = Path(cfg.out_dir)
    capsys.readouterr()
    ft = [f"data={cfg.data}", f"out_dir={out}", f"load={out / 'rwkv-2.pth'}", "mode=state", "device=cpu"]
    assert main([*ft, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "mode 'full' -> 'state'" in err and "load '' -> " in err and "model." not in err, err


def test_a_full_disk_is_one_line_and_keeps_the_saved_checkpoints(tmp_path: Path) -> None:
    """Writes past a file size limit fail as on a full disk (PyTorch: "unexpected pos"), for real."""
    import resource
    import signal
    import subprocess
    import sys

    cfg = tiny_config(tmp_path, stop_at_step=1, **FAST)
    Trainer(cfg).fit()
    out = Path(cfg.out_dir)
    saved = {p.name: p.read_bytes() for p in (out / "rwkv-1.pth", out / "train_state.pt")}

    def limit() -> None:  # the log fits, train_state.pt (~270 kB) does not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    cmd = [sys.executable, "-m", "rwkvkit.train.cli", *_cli_args(cfg, "--resume")]
    run = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    err = run.stderr.strip().splitlines()
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert err[-1].startswith(f"rwkvkit train: could not write {out / 'train_state.pt'}: the write stopped ")
    assert "is the disk full?" in err[-1] and err[-1].endswith("the files saved before it are intact")
    assert {p: (out / p).read_bytes() for p in saved} == saved and not list(out.glob("*.tmp"))
