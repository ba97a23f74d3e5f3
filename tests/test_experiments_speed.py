"""The speed experiment: the peak-memory measure sees known allocations; operators and decode at toy size."""

from __future__ import annotations

import json

import pytest
import torch

from rwkvkit.experiments import speed
from rwkvkit.experiments.memory import peak_bytes, peak_cpu_bytes

CPU = torch.device("cpu")
MB = 1 << 20


def test_peak_memory_sees_a_known_allocation():
    out, peak = peak_cpu_bytes(lambda: torch.empty(8 * MB, dtype=torch.uint8))
    assert out.numel() == 8 * MB
    assert 8 * MB <= peak < 8 * MB + 64 * 1024


def test_peak_memory_is_the_running_maximum_not_the_total():
    def fn():
        a = torch.ones(8 * MB, dtype=torch.uint8)
        b = torch.ones(4 * MB, dtype=torch.uint8)
        del a  # 12 MB live at most
        c = torch.ones(2 * MB, dtype=torch.uint8)
        return b, c

    _, peak = peak_bytes(fn, CPU)
    assert 12 * MB <= peak < 12 * MB + 64 * 1024
    x = torch.ones(16 * MB, dtype=torch.uint8)  # allocated before: not the call's
    _, peak = peak_bytes(lambda: x.add_(1), CPU)
    assert peak < 64 * 1024


def test_operator_memory_grows_with_T():
    p = speed.PRESETS_SPEED["toy"]
    peaks = [speed.measure_op("finch-chunked", "fwd+bwd", T, p, CPU)["peak_mib"] for T in (64, 256)]
    assert 2 < peaks[1] / peaks[0] < 8  # linear in T, not flat and not quadratic


@pytest.mark.parametrize("op", speed.OPS)
def test_every_operator_runs_forward(op):
    p = speed.PRESETS_SPEED["toy"]
    if not speed.op_applies(op, CPU):
        pytest.skip(f"{op} is not available here (native extension not built)")
    y = speed.run_op(op, speed.make_inputs(op, 32, p, CPU, grad=False))
    assert torch.isfinite(y).all()


def test_toy_preset_end_to_end(tmp_path):
    assert speed.main(["--preset", "toy", "--out", str(tmp_path), "--quiet"]) == 0
    data = json.loads((tmp_path / "speed-toy.json").read_text())
    assert data["info"]["command"] == f"rwkvkit experiment speed --preset toy --out {tmp_path} --quiet"
    ops = {(r["op"], r["mode"]) for r in data["operators"]}
    assert ("attention", "fwd+bwd") in ops and ("mamba", "fwd") in ops and ("finch-chunked", "fwd+bwd") in ops
    assert all(r["ms"] > 0 and r["peak_mib"] > 0 for r in data["operators"])
    assert all(0 < r["cpu_ms"] for r in data["operators"])  # what each call costs, beside its wall time
    assert all(r["cpu_ms_per_token"] > 0 for r in data["decode"])
    dec = data["decode"]
    finch = [r["state_mib"] for r in dec if r["model"] == "finch"]
    kv = {r["context"]: r["state_mib"] for r in dec if r["model"] == "transformer"}
    assert len(set(finch)) == 1  # the recurrent state does not grow with the context
    p = speed.PRESETS_SPEED["toy"]
    for ctx, mib in kv.items():  # K and V for every layer and token, fp32
        assert mib * speed.MiB == 2 * p.decode_layers * ctx * p.d_model * 4
    assert (tmp_path / "speed-toy.png").stat().st_size > 1000


def test_time_call_counts_cpu_seconds_not_waits():
    import time

    sec, n, cpu = speed.time_call(lambda: time.sleep(0.05), CPU, repeat=2, budget_s=10.0)
    assert n == 2 and sec >= 0.045 and cpu < 0.02  # a sleep takes wall time but no CPU time


def test_no_decode_draws_what_was_measured_and_a_second_run_keeps_the_first(tmp_path, capsys):
    args = ["--preset", "toy", "--threads", "1", "--no-decode", "--ops", "attention", "--max-T", "64"]
    assert speed.main([*args, "--out", str(tmp_path), "--quiet"]) == 0
    png, md = tmp_path / "speed-toy.png", tmp_path / "speed-toy.md"
    assert png.stat().st_size > 1000 and "Decoding" not in md.read_text()
    before = md.read_text()
    with pytest.raises(SystemExit) as e:  # the result is there: refused before any measuring
        speed.main([*args, "--out", str(tmp_path), "--quiet"])
    assert e.value.code == 2
    assert "exists; --overwrite replaces it" in capsys.readouterr().err
    assert md.read_text() == before
    assert speed.main([*args, "--out", str(tmp_path), "--quiet", "--overwrite"]) == 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seed", "-1"], "argument --seed: must be >= 0"),
        (["--threads", "-2"], "argument --threads: must be >= 0"),
        (["--device", "bogus"], "argument --device: 'bogus' is not a device name"),
        (["--max-T", "0"], "argument --max-T: must be a positive integer, got 0"),
        (["--max-T", "-1"], "argument --max-T"),
        (["--max-layers", "0"], "argument --max-layers"),
        (["--ops", ""], "argument --ops"),
        (["--ops", "attention,attention"], "attention given more than once"),
    ],
)
def test_bad_options_are_refused_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        speed.main(["--preset", "toy", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        speed.main(["--preset", "toy", "--device", "cuda"])
    assert e.value.code == 2 and "use --device cpu" in capsys.readouterr().err


def test_help_says_the_default_preset(capsys):
    with pytest.raises(SystemExit):
        speed.main(["--help"])
    assert "(default: cpu)" in capsys.readouterr().out
