"""torchrun on CPU (gloo): 2-process DDP and FSDP2 runs follow the 1-process loss curve of the same
global batch, and write the same official checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkvkit

from .test_train_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _yaml(tmp_path: Path, version: int = 6) -> Path:
    cfg = tiny_config(tmp_path, max_steps=4, eval_every=2, accum_steps=2, version=version)
    keys = (
        "data",
        "ctx_len",
        "max_steps",
        "warmup_steps",
        "lr_init",
        "lr_final",
        "device",
        "threads",
        "eval_every",
        "eval_batches",
        "save_every",
        "progress",
        "accum_steps",
    )
    y = tmp_path / "cfg.yaml"
    y.write_text(
        f"model: {json.dumps(cfg.model.to_dict())}\n"
        + "".join(f"{k}: {json.dumps(getattr(cfg, k))}\n" for k in keys)
    )
    return y


def _run(args: list[str], nproc: int = 1, torchrun: bool | None = None) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    torchrun = nproc > 1 if torchrun is None else torchrun
    cmd = (launcher if torchrun else [sys.executable]) + ["-m", "rwkvkit.train.cli", *args]
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _curve(run: Path) -> tuple[list[float], list[float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs], [r["val_loss"] for r in recs if "val_loss" in r]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """version -> (folder, config) of a one-process run, made on first use."""
    runs: dict[int, tuple[Path, Path]] = {}

    def get(version: int) -> tuple[Path, Path]:
        if version not in runs:
            tmp = tmp_path_factory.mktemp(f"dist{version}")
            y = _yaml(tmp, version)
            _run(["--config", str(y), "micro_bsz=4", f"out_dir={tmp / 'one'}"])
            runs[version] = tmp, y
        return runs[version]

    return get


@pytest.mark.parametrize("version", [6, 7], ids=["finch", "goose"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(single_runs, strategy, version):
    tmp, y = single_runs(version)
    _run(["--config", str(y), "micro_bsz=2", f"strategy={strategy}", f"out_dir={tmp / strategy}"], nproc=2)
    loss1, val1 = _curve(tmp / "one")
    loss2, val2 = _curve(tmp / strategy)
    assert len(loss1) == len(loss2) == 4 and len(val2) == 2
    assert loss2 == pytest.approx(loss1, rel=1e-4)
    assert val2 == pytest.approx(val1, rel=1e-4)
    assert loss1[-1] < loss1[0]
    a = torch.load(tmp / "one" / "rwkv-final.pth", weights_only=True)
    b = torch.load(tmp / strategy / "rwkv-final.pth", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:  # bf16 files: allow one bf16 ulp of difference
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-2, atol=1e-3, msg=k)
    rwkvkit.load(tmp / strategy / "rwkv-final.pth")  # an official checkpoint


@pytest.mark.parametrize("torchrun", [True, False], ids=["torchrun-x1", "plain-python"])
def test_ddp_with_one_process_follows_the_single_run(single_runs, torchrun):
    """DDP needs a process group even for one process: under torchrun and without it."""
    tmp, y = single_runs(6)
    out = tmp / f"ddp1-{torchrun}"
    _run(["--config", str(y), "micro_bsz=4", "strategy=ddp", f"out_dir={out}"], torchrun=torchrun)
    assert _curve(out)[0] == pytest.approx(_curve(tmp / "one")[0], rel=1e-5)


def test_deepspeed_strategy_is_optional_with_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    try:
        import deepspeed  # noqa: F401

        pytest.skip("deepspeed is installed")
    except ImportError:
        pass
    from rwkvkit.train.trainer import Trainer

    with pytest.raises(RuntimeError, match="pip install deepspeed"):
        Trainer(tiny_config(tmp_path, strategy="deepspeed"))
