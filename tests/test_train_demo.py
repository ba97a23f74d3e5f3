"""The shipped demo model generates text; example configs parse; the training benchmark runs."""

from __future__ import annotations

import glob
from pathlib import Path

import pytest

from rwkvkit import demo
from rwkvkit.train.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "configs" / "*.yaml"))))
def test_example_configs_are_valid(path):
    cfg = load_config(path, ["data=tokens.npy", "load=model.pth"])
    assert cfg.max_steps > 0 and cfg.ctx_len > 0


def test_demo_model_is_shipped_small_and_generates(capsys):
    assert demo.MODEL.is_file() and demo.VOCAB.is_file(), "run scripts/train_demo.sh"
    total = sum(p.stat().st_size for p in demo.ASSETS.iterdir() if p.is_file())
    assert total <= 25 * 2**20
    assert demo.main(["--max-tokens", "12", "--seed", "1", "In the beginning"]) == 0
    out = capsys.readouterr().out
    text = out.split("In the beginning", 1)[1].split("\u2500")[0]
    assert len(text.strip()) > 5  # it continued the prompt
    assert "Finch (RWKV-6) L6 C256 V8192" in out


def test_demo_without_model_says_how_to_get_one(tmp_path, capsys):
    assert demo.main(["--model", str(tmp_path / "none.pth")]) == 1
    assert "train_demo.sh" in capsys.readouterr().err


def test_train_benchmark_runs_both_backends(capsys):
    from rwkvkit.bench.train import main

    assert main(["--shapes", "tiny", "--ctx", "32", "--threads", "1", "--json"]) == 0
    import json

    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["backend"] for r in rows] == ["chunked", "naive"]
    assert all(r["tokens_per_s"] > 0 for r in rows) and "chunked_speedup" in rows[-1]
