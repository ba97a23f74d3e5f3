"""MQAR as Zoology defines it: the task's invariants, the scoring, the held-out sets, a toy run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rwkvkit.experiments import mqar
from rwkvkit.experiments.mqar import IGNORE, MQARTask, Stream, generate, held_out


def _rows(task, n=300, seed=0):
    return generate(task, n, np.random.default_rng(seed))


@pytest.mark.parametrize("V,T,N", [(64, 32, 4), (256, 64, 16), (8192, 512, 64)])
def test_keys_and_values_come_from_disjoint_halves(V, T, N):
    x, _ = _rows(MQARTask(V, T, N), n=50)
    keys, values = x[:, 0 : 2 * N : 2], x[:, 1 : 2 * N : 2]
    assert keys.min() >= 1 and keys.max() < V // 2
    assert values.min() >= V // 2 and values.max() < V
    for k, v in zip(keys, values):  # distinct within an example
        assert len(set(k)) == N and len(set(v)) == N


@pytest.mark.parametrize("V,T,N", [(64, 32, 4), (128, 64, 4), (256, 256, 16)])
def test_every_key_is_queried_exactly_once_and_only_queries_are_labelled(V, T, N):
    x, y = _rows(MQARTask(V, T, N))
    for row, lab in zip(x, y):
        keys, values = row[0 : 2 * N : 2], row[1 : 2 * N : 2]
        query_region = row[2 * N :]
        scored = np.flatnonzero(lab != IGNORE)
        assert len(scored) == N and (scored >= 2 * N).all() and (scored % 2 == 0).all()
        for k, v in zip(keys, values):
            where = np.flatnonzero(query_region == k) + 2 * N
            assert len(where) == 1  # the key appears once after the pairs: its query
            assert lab[where[0]] == v  # and the label there is its value
        assert set(row[scored]) == set(keys)  # labels sit exactly at the queries
    assert (y[:, : 2 * N] == IGNORE).all()


def test_gaps_follow_zoologys_power_law():
    task = MQARTask(64, 40, 1)  # one pair: the gap of its query is one draw from p
    x, y = _rows(task, n=40000, seed=1)
    gaps = (np.argmax(y != IGNORE, axis=1) - 2) // 2
    freq = np.bincount(gaps, minlength=task.slots) / len(gaps)
    p = task.gap_probs()
    assert p[0] > 10 * p[-1]  # a power law that favours short gaps
    assert np.abs(freq - p).max() < 0.01
    # without replacement: with N keys every gap is distinct, and short gaps are still favoured
    x, y = _rows(MQARTask(64, 40, 8), n=2000, seed=2)
    slots = (np.stack([np.flatnonzero(r != IGNORE) for r in y]) - 16) // 2
    assert all(len(set(s)) == 8 for s in slots)
    assert np.mean(slots) < (task.slots - 8) / 2


def test_task_rejects_impossible_shapes():
    with pytest.raises(ValueError, match="even"):
        MQARTask(64, 31, 4)
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs"):
        MQARTask(64, 32, 9)
    with pytest.raises(ValueError, match="too few keys"):
        MQARTask(16, 64, 8)


def test_only_query_positions_are_scored():
    task = MQARTask(64, 32, 4)
    x, y = _rows(task, n=8)
    yt = torch.from_numpy(y)
    logits = torch.randn(8, 32, 64)
    loss = mqar.query_loss(logits, yt)
    mask = yt != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[mask], yt[mask])
    torch.testing.assert_close(loss, manual)
    noisy = logits.clone()
    noisy[~mask] = torch.randn_like(noisy[~mask]) * 100  # anything at other positions changes nothing
    torch.testing.assert_close(mqar.query_loss(noisy, yt), loss)


class _Oracle(torch.nn.Module):
    """Predicts each query's value (argmax) except where told to answer with the value's neighbour."""

    def __init__(self, y: np.ndarray, V: int, wrong_every: int = 0):
        super().__init__()
        self.y, self.V, self.wrong_every = torch.from_numpy(y), V, wrong_every

    def forward(self, tokens):
        B, T = tokens.shape
        rows = self.y[self.offset : self.offset + B]
        self.offset += B
        logits = torch.zeros(B, T, self.V)
        target = rows.clamp(min=0)
        if self.wrong_every:
            target = torch.where(
                torch.arange(B)[:, None] % self.wrong_every == 0, (target + 1) % self.V, target
            )
        logits.scatter_(2, target[..., None], 5.0)
        logits[..., 0] = (
            4.0  # a strong runner-up everywhere: only the argmax over the whole vocabulary counts
        )
        return logits


def test_accuracy_is_exact_argmax_at_queries():
    task = MQARTask(64, 32, 4)
    x, y = _rows(task, n=40)
    oracle = _Oracle(y, 64)
    oracle.offset = 0
    assert mqar.accuracy(oracle, x, y, torch.device("cpu"), batch=16) == 1.0
    half = _Oracle(y, 64, wrong_every=2)  # every other example answered wrong
    half.offset = 0
    assert mqar.accuracy(half, x, y, torch.device("cpu"), batch=40) == pytest.approx(0.5)


def test_test_examples_never_appear_in_training():
    # a task with only 3 keys x 4 values x 7 fillers = 84 distinct examples: collisions are certain
    task = MQARTask(8, 4, 1)
    test_x, _ = held_out(task, 30, seed=0, which=3)
    stream = Stream(task, seed=0, exclude=[test_x])
    seen = np.concatenate([stream.batch(100)[0] for _ in range(20)])
    test_rows = {r.tobytes() for r in test_x}
    assert not any(r.tobytes() in test_rows for r in seen)
    assert stream.redrawn > 0  # the check did fire
    # and the validation and test sets come from different streams than training
    val_x, _ = held_out(MQARTask(64, 32, 4), 50, seed=0, which=2)
    tst_x, _ = held_out(MQARTask(64, 32, 4), 50, seed=0, which=3)
    assert not np.array_equal(val_x, tst_x)


def test_fresh_examples_every_step():
    stream = Stream(MQARTask(256, 64, 4), seed=0, exclude=[])
    a, b = stream.batch(64)[0], stream.batch(64)[0]
    assert not {r.tobytes() for r in a} & {r.tobytes() for r in b}


def test_attention_learns_a_tiny_mqar():
    # real learning, not just running: within 120 steps attention recalls far above chance (1/16 values)
    torch.manual_seed(0)
    task = MQARTask(32, 16, 2)
    val, test = held_out(task, 128, 0, 2), held_out(task, 128, 0, 3)
    spec = mqar.RunSpec("attention", 32, 3e-3, 120, 32, eval_every=40, stop_acc=0.95)
    progress = mqar.Progress("test", enabled=False)
    res = mqar.train_run(
        spec, task, Stream(task, 0, [val[0], test[0]]), val, test, torch.device("cpu"), 0, progress, "t"
    )
    assert res["test_acc"] > 0.3, res["history"]
    assert res["history"][-1]["loss"] < res["history"][0]["loss"] - 0.5


def test_toy_preset_end_to_end(tmp_path):
    assert mqar.main(["--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    data = json.loads((tmp_path / "mqar-toy.json").read_text())
    info = data["info"]
    assert info["command"].startswith("rwkvkit experiment mqar --preset toy")
    assert info["seed"] == 0 and info["versions"]["torch"] == torch.__version__
    assert info["machine"]["cpu_count"] >= 1
    models = [r["model"] for r in data["results"]]
    assert models == ["rwkv4", "eagle", "finch", "attention", "mamba"]
    for r in data["results"]:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["runs"][0]["history"]
    assert (tmp_path / "mqar-toy.png").stat().st_size > 1000
    assert "Finch (RWKV-6)" in (tmp_path / "mqar-toy.md").read_text()


def _hist(accs: list[float], every: int = 100) -> list[dict]:
    return [{"step": every * (i + 1), "loss": 1.0, "val_acc": a} for i, a in enumerate(accs)]


def test_a_stuck_run_is_stopped_and_a_learning_or_nearly_solved_one_is_not():
    spec = mqar.RunSpec("rwkv4", 64, 3e-3, 1500, 64, patience=300, min_gain=0.02, give_up_below=0.9)
    # RWKV-4's curve on the cpu cell: 0.241 at step 700, then nothing better than 0.259
    stuck = [0.003, 0.024, 0.028, 0.074, 0.145, 0.196, 0.241, 0.247, 0.242, 0.254]
    assert mqar.plateaued(_hist(stuck), spec)
    assert not mqar.plateaued(_hist(stuck[:9]), spec)  # only 200 steps since the last gain
    rising = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.85]
    assert not mqar.plateaued(_hist(rising), spec)
    near = [0.5, 0.93, 0.95, 0.95, 0.95, 0.95, 0.96]  # slow tail above give_up_below goes on
    assert not mqar.plateaued(_hist(near), spec)
    assert not mqar.plateaued(_hist(stuck), mqar.RunSpec("rwkv4", 64, 3e-3, 1500, 64))  # patience 0: never


def _no_training(*a, **k):
    raise AssertionError("the experiment ran before its options were checked")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-steps", "0"], "argument --max-steps: must be a positive integer, got 0"),
        (["--max-steps", "-3"], "argument --max-steps"),
        (["--max-cells", "0"], "argument --max-cells"),
        (["--max-cells", "-1"], "argument --max-cells"),
        (["--models", ""], "argument --models"),
        (["--models", "finch,nope"], "unknown ['nope']"),
        (["--seed", "-1"], "argument --seed"),
        (["--device", "bogus"], "argument --device"),
    ],
)
def test_bad_options_are_refused_before_any_work(args, message, monkeypatch, capsys):
    monkeypatch.setattr(mqar, "run", _no_training)
    with pytest.raises(SystemExit) as e:
        mqar.main(["--preset", "toy", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_out_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mqar, "run", _no_training)
    f = tmp_path / "f"
    f.write_text("hi\n")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit) as e:
            mqar.main(["--preset", "toy", "--out", str(out)])
        assert e.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "mqar-toy.json").write_text("{}")  # an earlier result: kept unless --overwrite
    with pytest.raises(SystemExit):
        mqar.main(["--preset", "toy", "--out", str(tmp_path)])
    assert "mqar-toy.json' exists; --overwrite replaces it" in capsys.readouterr().err
    assert (tmp_path / "mqar-toy.json").read_text() == "{}"
