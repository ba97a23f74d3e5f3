"""The ``rwkvkit bench`` commands refuse bad options with one line (exit code 2) before any work, and
report what they measure where it reads right (bench train's speed-up, bench serve's gap)."""

from __future__ import annotations

import time

import pytest

from rwkvkit.bench import forward, ops, score, serve, serve_client, tokenizer, train

BAD = [
    (ops, ["--versions", "9"], "argument --versions: unknown ['9']"),
    (ops, ["--versions", ""], "argument --versions"),
    (ops, ["--repeat", "0"], "argument --repeat: must be a positive integer, got 0"),
    (forward, ["--decode", "0"], "argument --decode: must be a positive integer"),
    (forward, ["--repeat", "0"], "argument --repeat"),
    (forward, ["--batches", "0"], "argument --batches"),
    (forward, ["--prompt", "0"], "argument --prompt"),
    (forward, ["--layers", "0"], "argument --layers"),
    (forward, ["--version", "9"], "rwkvkit supports 4, 5, 6, 7"),
    (score, ["--ctx", "0,0"], "argument --ctx: must be a positive integer, got 0"),
    (score, ["--ctx", "5,2"], "argument --ctx: min 5 is above max 2"),
    (score, ["--ctx", "5"], "argument --ctx: needs min,max"),
    (score, ["--questions", "0"], "argument --questions"),
    (score, ["--repeat", "0"], "argument --repeat"),
    (train, ["--ctx", "0"], "argument --ctx"),
    (train, ["--repeat", "0"], "argument --repeat"),
    (train, ["--backends", "foo"], "argument --backends: unknown ['foo']"),
    (train, ["--shapes", ""], "argument --shapes"),
    (tokenizer, ["--repeat", "0"], "argument --repeat"),
    (tokenizer, ["--threads", "0"], "argument --threads"),
    (tokenizer, ["--twin-mb", "-1"], "argument --twin-mb"),
    (serve, ["--layers", "0"], "argument --layers"),
    (serve, ["--server-root", "/nonexistent"], "argument --server-root: '/nonexistent' is not a folder"),
    (serve, ["--measure", "gap", "--gap-stream-tokens", "16"], "must be at least 64"),
]


@pytest.mark.parametrize(
    "module,args,message", BAD, ids=[f"{m.__name__.split('.')[-1]} {' '.join(a)}" for m, a, _ in BAD]
)
def test_bad_options_are_refused_in_one_line(module, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bench_ops_help_names_the_command(capsys):
    with pytest.raises(SystemExit):
        ops.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: rwkvkit bench ops")


def test_train_speedup_is_printed_on_the_chunked_row(capsys):
    assert train.main(["--shapes", "tiny", "--ctx", "16", "--threads", "1"]) == 0
    lines = {ln.split()[6]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert lines["chunked"].rstrip().endswith("x") and not lines["naive"].rstrip().endswith("x")


def test_gap_of_a_stream_that_ends_before_the_prompts_is_not_a_gap(monkeypatch):
    """The stream runs out of tokens while the long prompts are still being read: no worst gap."""

    def events(url, body):
        for _ in range(30):
            time.sleep(0.001)
            yield {"choices": [{"text": "x"}]}

    def slow_prompt(url, body):
        time.sleep(0.3)
        return {}

    monkeypatch.setattr(serve_client, "stream_events", events)
    monkeypatch.setattr(serve_client, "post_json", slow_prompt)
    args = type("A", (), {"gap_stream_tokens": 30, "long_tokens": 4, "long_prompts": 2})()
    g = serve_client.measure_gap("http://x", args)
    assert g["worst_gap_s"] is None and g["stream_ended_s"] < g["prefill_s"]
