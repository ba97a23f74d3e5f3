"""``rwkvkit eval``: the lm-eval adapter against the scoring functions, and the real lm_eval end to
end on the local task files (one per output type) with the demo model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import rwkvkit
from rwkvkit import scoring
from rwkvkit.demo import MODEL, VOCAB

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from rwkvkit.eval import cli  # noqa: E402
from rwkvkit.eval.harness import RWKVLM  # noqa: E402

TASKS = Path(cli.__file__).parent / "tasks"


@pytest.fixture(scope="module")
def demo():
    return rwkvkit.load(MODEL), rwkvkit.Tokenizer(VOCAB)


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """lm-eval reads the local JSON lines through `datasets`: keep its cache in tmp, never the hub."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def _direct(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0][0], -1)
    pos = range(len(ids) - n_cont - 1, len(ids) - 1)
    return sum(lp[p, ids[p + 1]].item() for p in pos), all(int(lp[p].argmax()) == ids[p + 1] for p in pos)


def test_loglikelihood_requests(demo):
    model, tok = demo
    lm = RWKVLM(model, tok, batch_size=2)
    reqs = [
        ("In the beginning, God created the", " heavens and the earth."),
        ("In the beginning, God created the ", "ships"),  # the context's trailing space moves over
        ("import os\nimport", " sys"),
        ("", "Hello"),  # an empty context: the prefix ('\n') alone
    ]
    got = lm.loglikelihood([_req("loglikelihood", c, k) for c, k in reqs])
    nl = tok.encode("\n")
    for (ctx, cont), (lp, greedy) in zip(reqs, got):
        c = ctx.rstrip()
        k = ctx[len(c) :] + cont
        ctx_ids = tok.encode(c)
        cont_ids = tok.encode(c + k)[len(ctx_ids) :]
        want = _direct(model, nl + ctx_ids + cont_ids, len(cont_ids))
        assert lp == pytest.approx(want[0], abs=1e-4) and greedy == want[1]

    plain = RWKVLM(model, tok, context_prefix="")  # no prefix: an empty context starts after token 0
    (lp, _), = plain.loglikelihood([_req("loglikelihood", "", "Hello")])  # fmt: skip
    assert lp == pytest.approx(
        _direct(model, [0] + tok.encode("Hello"), len(tok.encode("Hello")))[0], abs=1e-4
    )


def test_loglikelihood_rolling_requests(demo):
    model, tok = demo
    lm = RWKVLM(model, tok, chunk_len=32)
    texts = ["In the beginning, God created the heavens and the earth. " * 6, "x"]
    got = lm.loglikelihood_rolling([_req("loglikelihood_rolling", t) for t in texts])
    for t, lp in zip(texts, got):
        ids = [0] + tok.encode(t)
        assert len(ids) > 32 or t == "x"
        assert lp == pytest.approx(_direct(model, ids, len(ids) - 1)[0], abs=1e-3)


def test_generate_until_requests(demo):
    model, tok = demo
    lm = RWKVLM(model, tok, batch_size=2)
    prompts = ["In the beginning, God created the heavens and the", "import os\nimport", "def f(x):\n"]
    kwargs = [{"until": ["."], "max_gen_toks": 6}, {"until": "\n", "max_gen_toks": 6}, {"max_gen_toks": 5}]
    got = lm.generate_until([_req("generate_until", p, k) for p, k in zip(prompts, kwargs)])
    nl = tok.encode("\n")
    for p, kw, text in zip(prompts, kwargs, got):
        ids, out = nl + tok.encode(p), []
        with torch.no_grad():  # greedy, one token at a time
            logits, state = model(ids, last_only=True)
            for _ in range(kw["max_gen_toks"]):
                t = int(logits[0, -1].argmax())
                if t == 0:
                    break
                out.append(t)
                logits, state = model([t], state)
        want = tok.decode(out)
        until = kw.get("until", [])
        for s in [until] if isinstance(until, str) else until:
            want = want.split(s)[0]
        assert text == want


def test_task_specs(tmp_path):
    specs, names = cli.task_specs(["rwkvkit_mc", "piqa", str(TASKS / "rwkvkit_gen.yaml")])
    assert names == ["piqa"] and specs[1] == "piqa"
    assert specs[0]["task"] == "rwkvkit_mc" and specs[2]["task"] == "rwkvkit_gen"
    assert Path(specs[0]["dataset_kwargs"]["data_files"]["test"]) == TASKS / "mc.jsonl"
    specs, names = cli.task_specs([cli.ALL_LOCAL])
    assert sorted(s["task"] for s in specs) == [
        "rwkvkit_cloze",
        "rwkvkit_gen",
        "rwkvkit_mc",
        "rwkvkit_rolling",
    ]
    with pytest.raises(cli.TaskError, match="no such task file"):
        cli.task_specs([str(tmp_path / "nope.yaml")])
    with pytest.raises(cli.TaskError, match="no task YAML"):
        cli.task_specs([str(tmp_path)])
    (tmp_path / "bad.yaml").write_text("metric_list: []\n")
    with pytest.raises(cli.TaskError, match="not an lm-eval task file"):
        cli.task_specs([str(tmp_path / "bad.yaml")])


def test_lm_eval_end_to_end_on_local_tasks(demo, tmp_path, monkeypatch, offline_datasets, capsys):
    """The real lm_eval over a copy of the shipped task folder, run from another directory; the
    multiple-choice accuracy it reports equals the one computed here from the scoring functions."""
    model, tok = demo
    tasks = tmp_path / "my_tasks"
    shutil.copytree(TASKS, tasks)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results.json"
    rc = cli.main(
        ["--tasks", str(tasks), "--output", str(out), "--batch-size", "4", "--bootstrap-iters", "10"]
    )
    assert rc == 0
    shown = capsys.readouterr().out
    for name in (
        "Tasks",
        "Metric",
        "rwkvkit_mc",
        "rwkvkit_cloze",
        "rwkvkit_rolling",
        "rwkvkit_gen",
        "acc_norm",
    ):
        assert name in shown
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"rwkvkit_mc", "rwkvkit_cloze", "rwkvkit_rolling", "rwkvkit_gen"}

    docs = [json.loads(line) for line in (TASKS / "mc.jsonl").read_text(encoding="utf-8").splitlines()]
    nl = tok.encode("\n")
    pairs = []
    for d in docs:
        ctx = tok.encode(d["context"])
        pairs += [(nl + ctx, tok.encode(d["context"] + ch)[len(ctx) :]) for ch in d["choices"]]
    scores = [s.logprob for s in scoring.loglikelihood(model, pairs)]
    acc, acc_norm, k = [], [], 0
    for d in docs:
        lls = np.array(scores[k : k + len(d["choices"])])
        k += len(d["choices"])
        acc.append(int(np.argmax(lls)) == d["label"])
        acc_norm.append(int(np.argmax(lls / np.array([len(c) for c in d["choices"]]))) == d["label"])
    assert res["rwkvkit_mc"]["acc,none"] == pytest.approx(np.mean(acc))
    assert res["rwkvkit_mc"]["acc_norm,none"] == pytest.approx(np.mean(acc_norm))
    assert 0 < np.mean(acc) < 1  # the demo model gets some right and some wrong: the check can fail

    cloze = [
        json.loads(line)["text"] for line in (TASKS / "cloze.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    greedy = []
    for text in cloze:
        ctx, last = text.rsplit(" ", 1)
        ctx_ids = tok.encode(ctx)
        greedy.append(
            scoring.loglikelihood(model, [(nl + ctx_ids, tok.encode(ctx + " " + last)[len(ctx_ids) :])])[
                0
            ].greedy
        )
    assert res["rwkvkit_cloze"]["acc,none"] == pytest.approx(np.mean(greedy))
    assert res["rwkvkit_rolling"]["bits_per_byte,none"] > 0
    assert 0 <= res["rwkvkit_gen"]["exact_match,remove_whitespace"] <= 1


@pytest.mark.parametrize("args, says", [(["--limit", "2.5"], "--limit: must be a count"),
                                        (["--limit", "0"], "--limit: must be a count"),
                                        (["--num-fewshot", "-1"], "--num-fewshot must be >= 0")])  # fmt: skip
def test_impossible_settings_are_refused(args, says, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--tasks", "rwkvkit_mc", *args])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_an_existing_output_is_kept(tmp_path, capsys):
    out = tmp_path / "results.json"
    out.write_text("mine")
    assert cli.main(["--tasks", "rwkvkit_mc", "--limit", "1", "--output", str(out)]) == 2
    assert "exists; --force replaces it" in capsys.readouterr().err and out.read_text() == "mine"


def test_an_unreachable_dataset_is_one_line(monkeypatch, capsys):
    import lm_eval

    def offline(**kw):
        raise ConnectionError(
            "Couldn't reach 'EleutherAI/lambada_openai' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    assert cli.main(["--tasks", "rwkvkit_mc", "--limit", "1"]) == 1
    err = capsys.readouterr().err
    assert "could not be fetched (Couldn't reach" in err and "rwkvkit_local runs offline" in err


def test_missing_lm_eval_is_named(monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_lm_eval(name, *a, **kw):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert cli.main(["--tasks", "rwkvkit_mc"]) == 2
    assert "pip install 'rwkvkit[eval]'" in capsys.readouterr().err


def test_built_from_lm_eval_model_args():
    lm = RWKVLM(pretrained=str(MODEL), dtype="bf16", batch_size="auto", max_batch_size=None)
    assert lm.tokenizer.vocab_size == 8192  # the demo model's own vocabulary, found by resolve_vocab
    assert lm.model.head.weight.dtype == torch.bfloat16 and lm.batch_size == scoring.DEFAULT_BATCH_SIZE
    with pytest.raises(TypeError, match="dtyp"):
        RWKVLM(pretrained=str(MODEL), dtyp="bf16")
    with pytest.raises(ValueError, match="pretrained"):
        RWKVLM()
