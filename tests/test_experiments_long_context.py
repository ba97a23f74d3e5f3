"""The long-context experiment: held-out books never reach training, windows and position losses are
right, and the whole pipeline runs at toy size (synthetic books; the real books when installed)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from rwkvkit.experiments import long_context as lc
from rwkvkit.experiments.report import Progress


def _book(seed: int, words: int) -> str:
    rng = random.Random(seed)
    vocab = [f"w{seed}x{i}" for i in range(40)] + ["the", "and", "of", "a"]
    return " ".join(rng.choice(vocab) for _ in range(words)) + "\n"


BOOKS = {"a/one": _book(1, 900), "a/two": _book(2, 900), "b/three": _book(3, 900), "b/four": _book(4, 600)}


def test_split_books_keeps_held_out_books_apart():
    train, test = lc.split_books(BOOKS, ["a/two", "b/four"])
    assert sorted(train) == ["a/one", "b/three"] and sorted(test) == ["a/two", "b/four"]
    with pytest.raises(ValueError, match="not found"):
        lc.split_books(BOOKS, ["c/missing"])
    with pytest.raises(ValueError, match="no training books"):
        lc.split_books({"x": "text"}, ["x"])


def test_held_out_text_never_reaches_the_training_tokens():
    train, test = lc.split_books(BOOKS, ["a/two", "b/four"])
    vocab, stream, held = lc.encode_books(train, test, 300)
    # each held-out book's words are unique to it, so none of its 8-token windows is in the stream
    s = stream.astype(np.int64).tobytes()
    for ids in held.values():
        for i in range(0, len(ids) - 8, 50):
            assert ids[i : i + 8].tobytes() not in s
    # while the training books are in it, each ended by token 0
    assert (stream == 0).sum() == len(train)


def test_eval_windows_are_disjoint_and_taken_from_every_book():
    held = {"a": np.arange(1000), "b": np.arange(450)}
    w = lc.eval_windows(held, 200, 5)
    assert w == [("a", 0), ("b", 0), ("a", 200), ("b", 200), ("a", 400)]
    w = lc.eval_windows(held, 200, 100, stride=100)  # overlapping; every window fits its book
    assert len(w) == 8 + 3 and ("b", 200) in w and ("b", 300) not in w and ("a", 700) in w
    assert all(s + 201 <= len(held[b]) for b, s in w)
    with pytest.raises(ValueError, match="no held-out book"):
        lc.eval_windows(held, 5000, 2)


def test_position_losses_in_chunks_equal_one_pass():
    from rwkvkit.experiments.models import build

    lm = build("finch", 1, 32, 50, head_size=16).net
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    tokens = np.random.default_rng(0).integers(0, 50, 70)
    one = lc.position_losses(lm, tokens, torch.device("cpu"), chunk=1000)
    chunked = lc.position_losses(lm, tokens, torch.device("cpu"), chunk=16)
    assert one.shape == (69,)
    np.testing.assert_allclose(chunked, one, rtol=1e-4, atol=1e-5)
    bins = lc.log_bins(69, 10)
    assert bins[0][0] == 1 and bins[-1][1] == 70 and all(a < b for a, b in bins)


def test_toy_run_trains_three_models_and_reports_bands(tmp_path):
    preset = lc.PRESETS_LC["toy"]
    preset = lc.replace(preset, held_out=["a/two", "b/four"])
    out = lc.run(preset, torch.device("cpu"), 0, tmp_path, 0, Progress("t", enabled=False), books=BOOKS)
    assert list(out["models"]) == ["rwkv4", "eagle", "finch"]
    assert set(out["books"]["held_out"]) == {"a/two", "b/four"} and "a/two" not in out["books"]["train"]
    for r in out["models"].values():
        assert r["steps"] == preset.max_steps
        assert r["final_train_loss"] is not None and np.isfinite(r["final_train_loss"])
        assert len(r["bands"]) == len(preset.bands) - 1 and all(np.isfinite(b["loss"]) for b in r["bands"])
    text = lc.table(preset, out)
    assert "Finch (RWKV-6)" in text and "loss @ [1, 8)" in text
    lc.plot(preset, out, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


# The real books come from Debian packages (r-cran-janeaustenr, sword-text-web); .ci/run does not
# install them, so these tests skip on machines without them.
needs_books = pytest.mark.skipif(
    not lc.read_books(),
    reason="Austen / WEB Bible not installed (apt-get install r-cran-janeaustenr sword-text-web)",
)


@needs_books
def test_real_held_out_books_are_not_in_training():
    books = lc.read_books()
    preset = lc.PRESETS_LC["cpu"]
    train, test = lc.split_books(books, preset.held_out)
    assert set(test) == {"austen/persuasion", "web/new-testament"}
    joined = "\n".join(train.values())
    assert "Sir Walter Elliot, of Kellynch Hall" in test["austen/persuasion"]
    assert "Sir Walter Elliot" not in joined  # Persuasion's characters appear in no training book
    assert "Kellynch" not in joined
    assert "The book of the genealogy of Jesus Christ" in test["web/new-testament"]
    assert "The book of the genealogy of Jesus Christ" not in joined
    # no line of either held-out book (longer than 40 characters) appears in any training book
    train_lines = {line for t in train.values() for line in t.splitlines()}
    for text in test.values():
        lines = [line for line in text.splitlines() if len(line) > 40]
        assert len(lines) > 5000 and not any(line in train_lines for line in lines)


def _no_training(*a, **k):
    raise AssertionError("the experiment ran before its options were checked")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "finch,finch"], "finch given more than once"),
        (["--models", ""], "argument --models"),
        (["--max-windows", "0"], "argument --max-windows"),
        (["--max-windows", "-1"], "argument --max-windows"),
        (["--max-eval-len", "0"], "argument --max-eval-len"),
        (["--max-eval-len", "-5"], "argument --max-eval-len"),
        (["--max-batch", "0"], "argument --max-batch"),
        (["--threads", "-2"], "argument --threads"),
        (["--resume", "--overwrite"], "pick one"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, args, message, monkeypatch, capsys):
    monkeypatch.setattr(lc, "run", _no_training)
    with pytest.raises(SystemExit) as e:
        lc.main(["--preset", "toy", "--out", str(tmp_path), "--work", str(tmp_path / "w"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_work_folder_with_a_run_needs_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    """A second run in the same work folder: one line naming the experiment's flags, and each flag
    takes it on (the trainings continued or started afresh)."""
    work = tmp_path / "w"
    (work / "finch").mkdir(parents=True)
    (work / "finch" / "train_state.pt").write_bytes(b"x")
    monkeypatch.setattr(lc, "run", _no_training)
    base = ["--preset", "toy", "--models", "finch", "--out", str(tmp_path), "--work", str(work)]
    with pytest.raises(SystemExit) as e:
        lc.main(base)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--resume continues them, --overwrite starts them afresh" in err
    seen = {}

    def fake_run(preset, device, seed, work, threads, progress, resume=False, overwrite=False):
        seen.update(resume=resume, overwrite=overwrite)
        raise KeyboardInterrupt  # got past the checks: enough

    monkeypatch.setattr(lc, "run", fake_run)
    for flag in ("--resume", "--overwrite"):
        with pytest.raises(KeyboardInterrupt):
            lc.main([*base, flag])
        assert seen == {"resume": flag == "--resume", "overwrite": flag == "--overwrite"}
