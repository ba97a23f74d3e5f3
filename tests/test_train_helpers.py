"""Shared helpers of the training tests (tiny token files and configs); no tests of its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rwkvkit.train.config import TrainConfig

V = 64  # vocabulary of the tiny test models


def pattern_tokens(path: Path, n: int = 6000, seed: int = 0, period: int = 13) -> Path:
    """A learnable token stream: a fixed random phrase of ``period`` ids repeated, documents of
    random length ended by 0, so a model can cut its loss far below log(V)."""
    rng = np.random.default_rng(seed)
    phrase = rng.integers(1, V, size=period)
    out: list[int] = []
    while len(out) < n:
        length = int(rng.integers(20, 80))
        start = int(rng.integers(0, period))
        out.extend(phrase[(start + np.arange(length)) % period].tolist())
        out.append(0)
    arr = np.asarray(out[:n], dtype=np.uint16)
    np.save(path, arr)
    return path


# the LoRA widths of the tiny models, per version (the others declare none)
TINY_SIZES = {6: dict(mix_lora=8, decay_lora=16), 7: dict(decay_lora=16, a_lora=16, v_lora=16, gate_lora=32)}
MODEL_KEYS = ("version", "n_layer", "n_embd", "head_size", "vocab_size", "ffn_dim", "mix_lora", "decay_lora",
              "a_lora", "v_lora", "gate_lora")  # fmt: skip


def tiny_config(tmp_path: Path, **kw) -> TrainConfig:
    """Finch L2 C64 on ``pattern_tokens``; overrides as keyword arguments (model keys such as
    ``version=7`` or ``n_layer=1`` go to the model section, with the version's tiny LoRA widths)."""
    data = tmp_path / "tokens.npy"
    if not data.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        pattern_tokens(data)
    model = dict(version=6, n_layer=2, n_embd=64, head_size=32, vocab_size=V)
    model |= {k: kw.pop(k) for k in MODEL_KEYS if k in kw}
    model = TINY_SIZES.get(model["version"], {}) | model
    base = dict(
        data=str(data),
        ctx_len=32,
        micro_bsz=4,
        max_steps=6,
        warmup_steps=0,
        lr_init=3e-3,
        lr_final=1e-3,
        device="cpu",
        threads=1,
        eval_every=0,
        eval_batches=2,
        save_every=0,
        progress=False,
        out_dir=str(tmp_path / "run"),
    )
    base.update(kw)
    return TrainConfig(model=model, **base)


def model_overrides(cfg: TrainConfig) -> list[str]:
    """The model section of ``cfg`` as command-line overrides (``model.n_layer=2`` ...)."""
    return [f"model.{k}={v}" for k, v in cfg.model.to_dict().items()]
