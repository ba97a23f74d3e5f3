"""``rwkvkit generate`` / ``rwkvkit chat`` end to end on a tiny checkpoint, and model-argument resolution."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

import rwkvkit
from rwkvkit.generation import generate, prefill
from rwkvkit.hub import HubFile, ModelNotFound, parse_hub_ref, resolve_model
from rwkvkit.run_cli import ChatSession, chat_main, generate_main, load_state_file
from rwkvkit.sampling import SamplingParams
from rwkvkit.state import State
from rwkvkit.testing import random_checkpoint

GREEDY_CLI = ["--temperature", "0"]  # the CLI keeps RWKV's default penalties
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("cli") / "tiny.pth"
    random_checkpoint(6, n_layer=2, n_embd=64, vocab_size=65536, head_size=32, seed=5, path=path)
    yield path
    torch.set_num_threads(n)


def test_generate_command_streams_the_continuation(ckpt: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        generate_main(["--model", str(ckpt), "--prompt", "Hello there", "--max-tokens", "10", *GREEDY_CLI])
        == 0
    )
    out = capsys.readouterr().out
    want = generate(
        rwkvkit.load(ckpt), rwkvkit.Tokenizer(), "Hello there", max_tokens=10, sampling=GREEDY, stream=False
    )
    assert out == want + "\n"


def test_generate_save_state_then_continue(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    st = tmp_path / "after.state"
    args = ["--model", str(ckpt), "--max-tokens", "6", *GREEDY_CLI]
    assert generate_main([*args, "--prompt", "Once", "--save-state", str(st)]) == 0
    first = capsys.readouterr().out[:-1]
    assert generate_main([*args, "--prompt", " more", "--state", str(st)]) == 0
    second = capsys.readouterr().out[:-1]
    model, tok = rwkvkit.load(ckpt), rwkvkit.Tokenizer()
    g = generate(model, tok, "Once", max_tokens=6, sampling=GREEDY)
    assert "".join(g) == first
    assert generate(model, tok, " more", max_tokens=6, sampling=GREEDY, state=g.state, stream=False) == second


def test_generate_reports_bad_arguments(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert generate_main(["--model", str(tmp_path / "missing.pth"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.state"
    bad.write_bytes(b"not a state")
    assert generate_main(["--model", str(ckpt), "--prompt", "x", "--state", str(bad)]) == 2
    assert "state" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(["--model", str(ckpt), "--prompt", "x", "--top-p", "7"])


def test_chat_session_save_load_continues_exactly(ckpt: Path, tmp_path: Path) -> None:
    model, tok = rwkvkit.load(ckpt), rwkvkit.Tokenizer()
    a = ChatSession(model, tok, GREEDY, max_tokens=12)
    a.reply("Hi, who are you?", io.StringIO())
    a.save(str(tmp_path / "conv.state"))
    b = ChatSession(model, tok, GREEDY, max_tokens=12)
    b.load(str(tmp_path / "conv.state"))
    b.needs_separator = a.needs_separator
    assert a.reply("And then?", io.StringIO()) == b.reply("And then?", io.StringIO())
    # the conversation state equals feeding the whole transcript from scratch
    c = ChatSession(model, tok, GREEDY, max_tokens=12)
    out = io.StringIO()
    first = c.reply("Hi, who are you?", out)
    prompt = "User: Hi, who are you?\n\nAssistant:"
    g = generate(model, tok, prompt, max_tokens=12, sampling=GREEDY, stop="\n\n")
    assert "".join(g).strip() == first == out.getvalue().strip()
    _, st = prefill(model, tok.encode(prompt) + g.tokens)
    torch.testing.assert_close(c.state["wkv"], st["wkv"], atol=1e-4, rtol=1e-4)


def test_chat_command_loop(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    f = tmp_path / "c.state"
    lines = f"Hello!\n/save {f}\n/reset\n/load {f}\n/load {tmp_path / 'nope'}\n/help\n/bogus\nBye\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert chat_main(["--model", str(ckpt), "--max-tokens", "8", *GREEDY_CLI]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 2 and "(saved to" in out and "(conversation reset)" in out
    assert "(loaded" in out and "cannot load" in out and "/reset" in out and "unknown command" in out
    assert f.exists() and State.load(f).batch_size == 1


def test_state_tuned_file(ckpt: Path, tmp_path: Path) -> None:
    model = rwkvkit.load(ckpt)
    cfg = model.config
    sd = {
        f"blocks.{i}.att.time_state": torch.randn(cfg.n_head, cfg.head_size, cfg.head_size) for i in range(2)
    }
    torch.save(sd, tmp_path / "tuned.pth")
    st = load_state_file(str(tmp_path / "tuned.pth"), model)
    assert torch.equal(st["wkv"][0, 0], sd["blocks.0.att.time_state"].transpose(-1, -2))
    torch.save({"blocks.0.att.time_state": sd["blocks.0.att.time_state"]}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="time_state"):
        load_state_file(str(tmp_path / "short.pth"), model)


def test_hub_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hub_ref("hf://BlinkDL/rwkv-6-world/RWKV-x060-World-1B6.pth") == HubFile(
        "BlinkDL/rwkv-6-world", "RWKV-x060-World-1B6.pth"
    )
    assert parse_hub_ref("BlinkDL/rwkv-6-world@main:a/b.pth") == HubFile(
        "BlinkDL/rwkv-6-world", "a/b.pth", "main"
    )
    assert parse_hub_ref("models/local.pth") is None
    local = tmp_path / "m.pth"
    local.write_bytes(b"x")
    assert resolve_model(str(local)) == local
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve_model(str(tmp_path / "absent.pth"))
    import huggingface_hub

    class LocalEntryNotFoundError(Exception):
        pass

    def offline(**kw):
        raise LocalEntryNotFoundError("no connection and not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ModelNotFound, match="unreachable.*local path"):
        resolve_model("hf://BlinkDL/rwkv-6-world/x.pth")


DEMO = Path(rwkvkit.__file__).parent / "assets" / "demo-finch-L6-C256.pth"


def test_demo_model_runs_with_the_vocabulary_beside_it(capsys: pytest.CaptureFixture) -> None:
    """The shipped demo model (8192 tokens) used to end in a traceback: the World vocabulary was forced."""
    args = ["--model", str(DEMO), "--prompt", "In the beginning", "--max-tokens", "12", *GREEDY_CLI]
    assert generate_main(args) == 0
    out = capsys.readouterr().out
    tok = rwkvkit.Tokenizer(DEMO.with_name(DEMO.stem + ".vocab.txt"))
    want = generate(rwkvkit.load(DEMO), tok, "In the beginning", max_tokens=12, sampling=GREEDY, stream=False)
    assert out == want + "\n" and want.strip()


def test_vocabulary_rule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from rwkvkit.model_args import find_vocab, load_tokenizer
    from rwkvkit.train.vocab import subset_vocab, write_vocab

    small = tmp_path / "small"
    small.mkdir()
    model = small / "rwkv-final.pth"
    random_checkpoint(6, n_layer=1, n_embd=64, vocab_size=300, head_size=32, seed=1, path=model)
    args = ["--model", str(model), "--prompt", "abc", "--max-tokens", "4", *GREEDY_CLI]
    assert generate_main(args) == 2  # no vocabulary: one clear line, no traceback
    err = capsys.readouterr().err
    assert "300 tokens" in err and "--vocab" in err and "Traceback" not in err
    vocab = subset_vocab(["hello world " * 50], 300)
    write_vocab(vocab, tmp_path / "mine.txt")
    assert generate_main([*args, "--vocab", str(tmp_path / "mine.txt")]) == 0  # named
    named = capsys.readouterr().out
    write_vocab(vocab, small / "vocab.txt")  # what the trainer leaves in out_dir
    assert find_vocab(model, 300) == small / "vocab.txt"
    assert generate_main(args) == 0 and capsys.readouterr().out == named
    write_vocab(vocab, small / "rwkv-final.vocab.txt")  # <stem>.vocab.txt wins over vocab.txt
    assert find_vocab(model, 300) == small / "rwkv-final.vocab.txt"
    assert find_vocab(model, 300, tmp_path / "mine.txt") == tmp_path / "mine.txt"
    assert find_vocab(tmp_path / "elsewhere" / "m.pth", 65536) is None  # World, by size
    with pytest.raises(ValueError, match="300 ids but the model only 200"):
        load_tokenizer(model, 200)
    with pytest.raises(ValueError, match="does not exist"):
        find_vocab(model, 300, tmp_path / "absent.txt")


@pytest.mark.parametrize("opts", [["--dtype", "bf16"], ["--quantize", "int8"], ["--dtype", "fp16"]])
def test_generate_dtype_and_quantize(ckpt: Path, capsys: pytest.CaptureFixture, opts: list[str]) -> None:
    assert (
        generate_main(["--model", str(ckpt), "--prompt", "Hi", "--max-tokens", "5", *GREEDY_CLI, *opts]) == 0
    )
    out = capsys.readouterr().out
    kw = {"dtype": torch.bfloat16} if "bf16" in opts else {"dtype": torch.float16} if "fp16" in opts else {}
    model = rwkvkit.load(ckpt, quantize="int8" if "int8" in opts else None, **kw)
    assert (
        out == generate(model, rwkvkit.Tokenizer(), "Hi", max_tokens=5, sampling=GREEDY, stream=False) + "\n"
    )


def test_chat_runs_the_int8_model(ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from rwkvkit.models.quant import Int8Linear

    seen = []
    init = ChatSession.__init__
    monkeypatch.setattr(
        ChatSession,
        "__init__",
        lambda self, model, *a, **k: (seen.append(model), init(self, model, *a, **k))[1],
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi, who are you?\n/quit\n"))
    opts = ["--max-tokens", "8", *GREEDY_CLI, "--dtype", "bf16", "--quantize", "int8"]
    assert chat_main(["--model", str(ckpt), *opts]) == 0
    out = capsys.readouterr().out
    assert any(isinstance(m, Int8Linear) for m in seen[0].modules())
    q8 = rwkvkit.load(ckpt, dtype=torch.bfloat16, quantize="int8")
    want = ChatSession(q8, rwkvkit.Tokenizer(), GREEDY, max_tokens=8).reply("Hi, who are you?", io.StringIO())
    assert out.count("Assistant: ") == 1 and want and want in out  # the int8 model's reply


def test_chat_survives_bad_state_files(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Every /load of a broken file reports it and the conversation goes on (a KeyError used to end it)."""
    model = rwkvkit.load(ckpt)
    _, st = model([1, 2, 3])
    good = {"format": "rwkvkit-state-1", "version": 6, **st.tensors}
    files = {
        "noversion": {k: v for k, v in good.items() if k != "version"},
        "batch": {**good, "wkv": torch.cat([st["wkv"]] * 2, dim=1)},
        "nan": {**good, "att_shift": torch.full_like(st["att_shift"], float("nan"))},
        "list": {**good, "ffn_shift": [0.0]},
    }
    for name, payload in files.items():
        torch.save(payload, tmp_path / name)
    (tmp_path / "junk").write_bytes(bytes(range(256)) * 4)
    loads = "".join(f"/load {tmp_path / n}\n" for n in [*files, "junk"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Hello!\n{loads}Still there?\n/quit\n"))
    assert chat_main(["--model", str(ckpt), "--max-tokens", "4", *GREEDY_CLI]) == 0
    out = capsys.readouterr().out
    assert out.count("cannot load") == 5 and out.count("Assistant: ") == 2


@pytest.mark.parametrize(
    "device, says",
    [("foo", "is not a device name"), ("mps", "only cpu and cuda"), ("cuda", "no CUDA"), ("cuda:64", "CUDA")],
)
def test_a_device_that_cannot_run_the_model_is_refused_naming_it(
    ckpt: Path, capsys: pytest.CaptureFixture, device: str, says: str
) -> None:
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert generate_main(["--model", str(ckpt), "--prompt", "x", "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device {device!r}" in err and says in err and "Traceback" not in err
    from rwkvkit.info import main as info_main

    assert info_main([str(ckpt), "--device", device]) == 1
    assert f"--device {device!r}" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, says", [("--port", "99999", "--port must be in 0..65535"),
                                               ("--threads", "-3", "--threads must be >= 0")])  # fmt: skip
def test_serve_refuses_an_impossible_port_or_thread_count(flag, value, says, capsys) -> None:
    from rwkvkit.serve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", "unused.pth", flag, value])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_outputs_never_replace_an_input_and_replace_a_file_only_when_asked(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = ["--model", str(ckpt), "--prompt", "x", "--max-tokens", "2", *GREEDY_CLI]
    keep = tmp_path / "keep.state"
    keep.write_bytes(b"mine")
    before = ckpt.read_bytes()
    for target, extra, says in [
        (keep, [], "exists; --force replaces it"),
        (ckpt, ["--force"], "is one of this command's inputs"),
        (tmp_path, [], "is a folder"),
        (tmp_path / "no" / "s.state", [], "does not exist"),
    ]:
        assert generate_main([*args, "--save-state", str(target), *extra]) == 2
        err = capsys.readouterr()
        assert says in err.err and err.out == ""  # refused before generating anything
    assert keep.read_bytes() == b"mine" and ckpt.read_bytes() == before and not (tmp_path / "no").exists()
    assert generate_main([*args, "--save-state", str(keep), "--force"]) == 0
    assert State.load(keep).batch_size == 1
    lines = f"Hi\n/save {keep}\n/save {ckpt}\n/save! {ckpt}\n/save! {keep}\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    mtime = keep.stat().st_mtime_ns
    assert chat_main(["--model", str(ckpt), "--max-tokens", "3", *GREEDY_CLI]) == 0
    out = capsys.readouterr().out
    assert "'/save! FILE' replaces it" in out and out.count("is one of this command's inputs") == 2
    assert out.count("(saved to") == 1 and keep.stat().st_mtime_ns != mtime and ckpt.read_bytes() == before


def test_input_that_is_not_utf8_is_read_as_its_bytes(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Python hands over argv and stdin bytes that are not UTF-8 as surrogate escapes: the model reads
    the bytes as given (no traceback, and chat goes on)."""
    raw = b"caf\xe9 \xff!"
    text = raw.decode("utf-8", "surrogateescape")
    assert generate_main(["--model", str(ckpt), "--prompt", text, "--max-tokens", "5", *GREEDY_CLI]) == 0
    out = capsys.readouterr().out
    model, tok = rwkvkit.load(ckpt), rwkvkit.Tokenizer()
    assert (
        out == generate(model, tok, list(tok.encode(raw)), max_tokens=5, sampling=GREEDY, stream=False) + "\n"
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{text}\nagain\n/quit\n"))
    assert chat_main(["--model", str(ckpt), "--max-tokens", "3", *GREEDY_CLI]) == 0
    assert capsys.readouterr().out.count("Assistant: ") == 2


@pytest.mark.parametrize("flag, value", [("--max-tokens", "-1"), ("--chunk-len", "0")])
def test_generate_and_chat_refuse_impossible_lengths(ckpt: Path, flag: str, value: str, capsys) -> None:
    for main in (generate_main, chat_main):
        with pytest.raises(SystemExit) as e:
            main(["--model", str(ckpt), "--prompt", "x", flag, value] if main is generate_main else
                 ["--model", str(ckpt), flag, value])  # fmt: skip
        assert e.value.code == 2 and f"{flag} must be" in capsys.readouterr().err
