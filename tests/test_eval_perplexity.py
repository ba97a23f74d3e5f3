"""``rwkvkit eval perplexity``: streamed tokenization == whole-file tokenization, the figures equal
the scoring functions', bits per byte from the file's bytes, bad input named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import rwkvkit
from rwkvkit import scoring
from rwkvkit.cli import main as cli_main
from rwkvkit.demo import MODEL, VOCAB
from rwkvkit.eval import perplexity

TEXT = (
    "Ünïcödé text — with multi-byte characters: 中文, emoji 🙂, and    runs of     spaces.\n\n"
    "def f(x):\n        return x  # indented\n" * 40
)


@pytest.fixture(scope="module")
def demo():
    return rwkvkit.load(MODEL), rwkvkit.Tokenizer(VOCAB)


@pytest.mark.parametrize("vocab", [None, VOCAB], ids=["world", "demo"])
def test_streamed_tokens_equal_whole_file_tokens(tmp_path: Path, vocab):
    tok = rwkvkit.Tokenizer(vocab)
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    whole = tok.encode(TEXT)
    for block in (257, 300, 1000, 1 << 20):  # blocks that cut characters and tokens anywhere
        assert list(perplexity.stream_tokens(tok, f, block=block)) == whole
    with pytest.raises(ValueError, match="block must exceed"):
        list(perplexity.stream_tokens(tok, f, block=100))


def test_score_file_equals_rolling_loglikelihood(tmp_path: Path, demo):
    model, tok = demo
    f = tmp_path / "t.txt"
    f.write_text(TEXT[:1500], encoding="utf-8")
    ids = [0] + tok.encode(TEXT[:1500])
    want = scoring.rolling_loglikelihood(model, ids, chunk_len=100)
    got = perplexity.score_file(model, tok, str(f), chunk_len=64)
    assert got.tokens == len(ids) - 1 and got.bytes == len(TEXT[:1500].encode("utf-8"))
    assert got.logprob == pytest.approx(want.logprob, abs=1e-3)
    assert got.perplexity == pytest.approx(math.exp(-want.logprob / got.tokens), rel=1e-5)
    assert got.bits_per_byte == pytest.approx(-want.logprob / math.log(2) / got.bytes, rel=1e-9)


def test_command_prints_and_writes_the_figures(tmp_path: Path, demo, capsys):
    model, tok = demo
    a, b, empty = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "empty.txt"
    a.write_text(TEXT[:600], encoding="utf-8")
    b.write_text("It is a truth universally acknowledged.", encoding="utf-8")
    empty.write_text("", encoding="utf-8")
    out = tmp_path / "ppl.json"
    args = ["eval", "perplexity", str(a), str(b), str(empty), "--chunk-len", "50", "--output", str(out)]
    assert cli_main(args) == 0  # the demo model and its vocabulary by default
    shown = capsys.readouterr().out
    for name in ("nats/token", "perplexity", "bits/byte", str(a), str(b), "(all)"):
        assert name in shown
    res = json.loads(out.read_text())
    files = {Path(r["file"]).name: r for r in res["files"]}
    assert files["empty.txt"]["tokens"] == 0
    want = perplexity.score_file(model, tok, str(b))
    assert files["b.txt"]["tokens"] == want.tokens
    assert files["b.txt"]["nats_per_token"] == pytest.approx(want.nats_per_token, abs=1e-5)
    total = res["total"]
    assert total["tokens"] == sum(r["tokens"] for r in res["files"])
    assert total["bits_per_byte"] == pytest.approx(
        -sum(r["logprob"] for r in res["files"]) / math.log(2) / total["bytes"], rel=1e-9
    )


def test_command_names_bad_input(tmp_path: Path, capsys):
    assert cli_main(["eval", "perplexity", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["eval", "perplexity", str(tmp_path)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    f = tmp_path / "a.txt"
    f.write_text("hello", encoding="utf-8")
    # the World vocabulary (65530 tokens) does not fit the demo model's 8192
    assert cli_main(["eval", "perplexity", str(f), "--vocab", str(rwkvkit.tokenizer.DEFAULT_VOCAB)]) == 2
    assert "--vocab" in capsys.readouterr().err
    assert cli_main(["eval", "perplexity", str(f), "--model", str(tmp_path / "nope.pth")]) == 2


def test_command_runs_the_int8_model(tmp_path: Path) -> None:
    """``--dtype`` and ``--quantize int8`` reach the model ``eval`` scores with: its figures are the
    int8 model's (and differ from fp32's)."""
    f, out = tmp_path / "b.txt", tmp_path / "ppl.json"
    f.write_text(TEXT[:400], encoding="utf-8")
    args = ["eval", "perplexity", str(f), "--dtype", "bf16", "--quantize", "int8", "--output", str(out)]
    assert cli_main(args) == 0
    got = json.loads(out.read_text())["files"][0]["nats_per_token"]
    q8, tok = rwkvkit.load(MODEL, dtype=torch.bfloat16, quantize="int8"), rwkvkit.Tokenizer(VOCAB)
    assert got == pytest.approx(perplexity.score_file(q8, tok, str(f)).nats_per_token, abs=1e-5)
    assert got != pytest.approx(
        perplexity.score_file(rwkvkit.load(MODEL), tok, str(f)).nats_per_token, abs=1e-5
    )


def test_outputs_keep_what_exists_and_empty_files_give_null_figures(tmp_path: Path, capsys) -> None:
    f, empty, out = tmp_path / "a.txt", tmp_path / "empty.txt", tmp_path / "out.json"
    f.write_text("hello", encoding="utf-8")
    empty.write_text("", encoding="utf-8")
    assert cli_main(["eval", "perplexity", str(f), "--output", str(f), "--force", "--quiet"]) == 2
    assert "one of this command's inputs" in capsys.readouterr().err and f.read_text() == "hello"
    out.write_text("mine")
    assert cli_main(["eval", "perplexity", str(f), "--output", str(out), "--quiet"]) == 2
    assert "exists; --force replaces it" in capsys.readouterr().err and out.read_text() == "mine"
    assert cli_main(["eval", "perplexity", str(empty), "--output", str(out), "--force", "--quiet"]) == 0
    figures = json.loads(out.read_text())  # strict JSON: no NaN
    assert figures["files"][0]["tokens"] == 0 and figures["files"][0]["perplexity"] is None
    with pytest.raises(SystemExit):
        cli_main(["eval", "perplexity", str(f), "--threads", "-1"])
    assert "--threads: must be >= 0" in capsys.readouterr().err
