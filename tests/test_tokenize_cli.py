"""``rwkvkit tokenize``: files and directories in, a binidx corpus out with exactly the documents' ids."""

from __future__ import annotations

import json

import pytest

from rwkvkit.cli import main as cli_main
from rwkvkit.data import tokenize_corpus
from rwkvkit.data.binidx import BinIdx
from rwkvkit.tokenizer import Tokenizer

TEXTS = {
    "a.txt": "The quick brown fox.\nJumps over the lazy dog.\r\n",
    "sub/b.md": "# 标题\n\n你好，世界。こんにちは。",
    "sub/deeper/c.txt": "",
    "sub/skip.bin": "not a text suffix, skipped when walking a directory",
    "sub/tool.py": "print('not a text suffix either')\n",
    "sub/deeper/x.py": "x = 1\n",
}
JSONL = ["Hello 🎉 world", "", "def f():\n    return 1\n", "Привет"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def _make_corpus(root) -> list[str]:
    """Files on disk; returns the documents in the order the command must write them."""
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8", newline="")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL)]
    (root / "d.jsonl").write_text(
        "\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8"
    )
    # directory walk is sorted: a.txt, d.jsonl, sub/b.md, sub/deeper/c.txt
    return [TEXTS["a.txt"], *JSONL, TEXTS["sub/b.md"], TEXTS["sub/deeper/c.txt"]]


@pytest.mark.parametrize("workers", [1, 2])
def test_tokenize_directory_gives_exact_ids(tmp_path, tok, workers, monkeypatch, capsys):
    monkeypatch.setattr(tokenize_corpus, "BLOCK_BYTES", 40)  # several jsonl tasks
    docs = _make_corpus(tmp_path / "in")
    out = tmp_path / "out" / "corpus"
    rc = cli_main(
        ["tokenize", str(tmp_path / "in"), "-o", str(out), "--workers", str(workers), "--no-progress"]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "7 documents" in captured.out and "; left out 3 files of other types" in captured.out
    assert captured.err.strip() == (  # said, so a user knows what a directory walk did not take
        "rwkvkit tokenize: left out 3 files of the input folders that are not text (.md/.rst/.text/.txt) "
        "or .jsonl: 2 .py, 1 .bin (name a file to take it whatever its extension)"
    )
    data = BinIdx(out)
    assert [data[i].tolist() for i in range(len(data))] == [tok.encode(d) + [0] for d in docs]
    assert data.n_tokens == sum(len(tok.encode(d)) + 1 for d in docs)
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.bin", "corpus.idx"]


def test_explicit_files_keep_given_order_and_key(tmp_path, tok):
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "second"}) + "\n", encoding="utf-8")
    (tmp_path / "y.dat").write_text("first", encoding="utf-8")
    out = tmp_path / "o"
    args = [str(tmp_path / "y.dat"), str(tmp_path / "x.jsonl"), "-o", str(out), "--jsonl-key", "content"]
    assert tokenize_corpus.main(args + ["--workers", "1", "--no-progress"]) == 0
    data = BinIdx(out)
    assert [d.tolist() for d in data] == [tok.encode("first") + [0], tok.encode("second") + [0]]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": 5}\n', "bad.jsonl:2: field 'text' is int"),
        ('{"text": "ok"}\n\n{"other": "x"}\n', "bad.jsonl:3: expected an object with a 'text' field"),
        ('{"text": "ok"}\nnot json\n', "bad.jsonl:2: not a JSON line"),
        ('{"text": "ok"}\n{"text": "a\\ud800"}\n', "bad.jsonl:2: the text holds a lone surrogate at index 1"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_input_keeps_previous_output(tmp_path, content, message, workers, capsys):
    good = tmp_path / "good.txt"
    good.write_text("hello", encoding="utf-8")
    out = tmp_path / "out" / "c"
    assert tokenize_corpus.main([str(good), "-o", str(out), "--no-progress"]) == 0
    before = out.with_suffix(".bin").read_bytes(), out.with_suffix(".idx").read_bytes()
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    rc = tokenize_corpus.main(
        [str(good), str(tmp_path / "bad.jsonl"), "-o", str(out), "--workers", str(workers)]
    )
    assert rc == 1
    assert message in capsys.readouterr().err
    assert (out.with_suffix(".bin").read_bytes(), out.with_suffix(".idx").read_bytes()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.bin", "c.idx"]


def test_missing_and_non_utf8_inputs(tmp_path, capsys):
    assert tokenize_corpus.main([str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert (
        tokenize_corpus.main([str(tmp_path / "latin1.txt"), "-o", str(tmp_path / "o"), "--workers", "1"]) == 1
    )
    assert "latin1.txt: not UTF-8 text" in capsys.readouterr().err
    assert not (tmp_path / "o.bin").exists()


def test_on_error_skip_leaves_out_bad_inputs(tmp_path, tok, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "one"}\nbroken\n{"text": "two"}\n', encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "in" / "c.txt").write_text("three", encoding="utf-8")
    out = tmp_path / "o"
    rc = tokenize_corpus.main([str(tmp_path / "in"), "-o", str(out), "--on-error", "skip", "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "a.jsonl:2: not a JSON line" in captured.err and "b.txt: not UTF-8 text" in captured.err
    assert "2 bad inputs skipped" in captured.out
    assert [d.tolist() for d in BinIdx(out)] == [tok.encode(t) + [0] for t in ("one", "two", "three")]


@pytest.mark.parametrize("ext", [".bin", ".idx"])
def test_output_that_is_a_folder_is_refused_first_and_leaves_no_temporary_files(tmp_path, ext, capsys):
    (tmp_path / "a.txt").write_text("hello\n", encoding="utf-8")
    (tmp_path / f"d{ext}").mkdir()
    with pytest.raises(SystemExit) as e:
        tokenize_corpus.main([str(tmp_path / "a.txt"), "-o", str(tmp_path / "d"), "--no-progress"])
    assert e.value.code == 2
    assert f"d{ext}' is a folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a folder"):  # the library call checks too
        tokenize_corpus.tokenize_files([str(tmp_path / "a.txt")], str(tmp_path / "d"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", f"d{ext}"]


def test_a_failure_while_moving_the_files_into_place_leaves_no_temporary_files(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("hello\n", encoding="utf-8")

    def fail(*a):
        raise OSError("disk gone")

    monkeypatch.setattr("rwkvkit.data.binidx.os.replace", fail)
    with pytest.raises(OSError, match="disk gone"):
        tokenize_corpus.tokenize_files([str(tmp_path / "a.txt")], str(tmp_path / "d"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
