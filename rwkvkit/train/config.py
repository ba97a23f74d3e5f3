"""TrainConfig: every choice of a training run, read from YAML and overridden from the command line.

One flat dataclass, one comment per field, grouped as model / data / optimisation / runtime /
fine-tuning. ``load_config(path, overrides)`` reads a YAML mapping (unknown keys are an error that
names them) and applies ``key=value`` overrides whose values are parsed as YAML scalars
(``lr_init=3e-4``, ``grad_checkpoint=true``, ``mode=lora``). ``validate()`` checks ranges and
combinations and raises ``ValueError`` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODES = ("full", "lora", "state")
SCHEDULES = ("cosine", "exp", "constant")
STRATEGIES = ("auto", "single", "ddp", "fsdp", "deepspeed")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    # ---- model (ignored when ``load`` gives a checkpoint: its shapes decide) ----
    version: int = 6  # 4, 5 (Eagle) or 6 (Finch)
    n_layer: int = 2  # number of blocks L
    n_embd: int = 64  # model width C (a multiple of head_size for v5/v6)
    head_size: int = 64  # v5/v6 head size N
    vocab_size: int = 0  # 0: taken from the tokenizer vocab file (vocab), else 65536
    ffn_dim: int = 0  # 0: the version's default
    mix_lora: int = 32  # Finch token-shift LoRA width D
    decay_lora: int = 64  # Finch decay LoRA width Dw
    # ---- data ----
    data: str = ""  # token file: binidx prefix, .npy / .bin of token ids (0 ends each document)
    vocab: str = ""  # vocabulary file of the data's ids (sets vocab_size; copied to out_dir/vocab.txt)
    val_data: str = ""  # optional held-out token file; else the last val_fraction of ``data``
    val_fraction: float = 0.01  # held-out tail of ``data`` for validation (when no val_data)
    ctx_len: int = 512  # tokens per sample (a random crop across document boundaries)
    micro_bsz: int = 4  # samples per process per micro-step
    accum_steps: int = 1  # micro-steps per optimiser step (gradient accumulation)
    seed: int = 0  # seeds init, data order (sample = f(seed, step, rank, i)) and dropout
    # ---- optimisation (RWKV-LM's recipe) ----
    lr_init: float = 6e-4  # learning rate after the warmup
    lr_final: float = 6e-5  # learning rate at max_steps
    lr_schedule: str = "cosine"  # cosine | exp | constant (after the warmup)
    warmup_steps: int = 10  # steps of linear warmup from lr_init/100 to lr_init
    max_steps: int = 100  # optimiser steps (the schedule's length)
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.99  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.001  # on 2-D weight matrices only (not time_*, not LoRA, not emb/ln)
    grad_clip: float = 1.0  # 0 disables
    l2wrap: float = 1e-4  # L2Wrap coefficient (0 disables): pushes down the largest logit
    # ---- runtime ----
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    backend: str = "chunked"  # WKV backend, one of rwkvkit.models.model.BACKENDS
    grad_checkpoint: bool = False  # recompute each block in backward (saves activation memory)
    chunk_len: int = 0  # >0: train ctx_len in chunks of chunk_len, state passed forward detached
    strategy: str = "auto"  # auto (ddp under torchrun, else single) | single | ddp | fsdp | deepspeed
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    max_minutes: float = 0.0  # >0: stop (and save) after this much wall-clock time
    stop_at_step: int = 0  # >0: stop (and save) after this step; the schedule still spans max_steps
    out_dir: str = "runs/train"  # run folder: checkpoints, train_state.pt, metrics.jsonl, loss.png, vocab.txt
    save_every: int = 100  # optimiser steps between checkpoints (and at the end)
    eval_every: int = 50  # steps between validation losses (0: only at the end)
    eval_batches: int = 8  # micro-batches per validation
    log_every: int = 1  # steps between metrics.jsonl records
    keep_last: int = 0  # >0: keep only the newest N numbered checkpoints (rwkv-final.pth always stays)
    progress: bool = True  # tqdm bar
    # ---- fine-tuning ----
    mode: str = "full"  # full | lora | state
    load: str = ""  # checkpoint to start from (required for lora/state)
    lora_r: int = 8  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scale alpha (the update is alpha / r * B @ A)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: list[str] = field(  # the matrices (name suffixes) that get LoRA adapters
        default_factory=lambda: [
            "att.receptance",
            "att.key",
            "att.value",
            "att.output",
            "att.gate",
            "ffn.key",
            "ffn.value",
            "ffn.receptance",
        ]
    )

    def validate(self) -> TrainConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(self.version in (4, 5, 6), f"version must be 4, 5 or 6, got {self.version!r}")
        for name in ("n_layer", "n_embd", "head_size", "ctx_len", "micro_bsz", "accum_steps", "max_steps"):
            need(int(getattr(self, name)) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(
            self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}"
        )
        need(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        from rwkvkit.models.model import BACKENDS  # the model's WKV backends (GPU kernels add theirs)

        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.lr_init > 0 and self.lr_final > 0, "lr_init and lr_final must be positive")
        need(0 <= self.warmup_steps <= self.max_steps, "warmup_steps must be in [0, max_steps]")
        need(self.chunk_len >= 0, "chunk_len must be >= 0")
        need(
            self.mode == "full" or bool(self.load), f"mode {self.mode!r} needs load=<checkpoint to fine-tune>"
        )
        need(self.mode != "state" or self.version != 4 or bool(self.load), "state tuning needs v5/v6")
        need(self.lora_r > 0, "lora_r must be positive")
        need(self.keep_last >= 0, f"keep_last must be >= 0, got {self.keep_last!r}")
        need(
            self.version == 4 or bool(self.load) or self.n_embd % self.head_size == 0,
            f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size} (heads = n_embd / head_size)",
        )
        need(self.vocab_size >= 0, f"vocab_size must be >= 0, got {self.vocab_size!r}")
        need(bool(self.data), "data=<token file> is required")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Check a value against the field's default type (ints accepted for floats)."""
    default = TrainConfig().__getattribute__(name)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"TrainConfig.{name} must be true/false, got {value!r}")
        return value
    if isinstance(default, float) and not isinstance(value, bool) and isinstance(value, (int, str)):
        try:
            return float(value)  # ints, and "3e-4" (a string to YAML 1.1)
        except ValueError:
            raise ValueError(f"TrainConfig.{name} must be a number, got {value!r}") from None
    if isinstance(default, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"TrainConfig.{name} must be a list, got {value!r}")
        return value
    if isinstance(default, str) and value is None:
        return ""
    if not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
        raise ValueError(f"TrainConfig.{name} must be {type(default).__name__}, got {value!r}")
    return value


def apply(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(_FIELDS)}")
    for k, v in values.items():
        setattr(cfg, k, _coerce(k, v))
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr_init=3e-4", "mode=lora"]`` -> ``{"lr_init": 0.0003, "mode": "lora"}`` (values as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        try:
            out[k] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            raise ValueError(f"override {item!r}: the value is not valid YAML") from None
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> TrainConfig:
    """A TrainConfig from a YAML file (optional) plus overrides, validated."""
    cfg = TrainConfig()
    if path:
        import yaml

        try:
            text = Path(path).read_text()
        except OSError as e:
            raise FileNotFoundError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}:{where} is not valid YAML ({what})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: a training config must be a YAML mapping, got {type(values).__name__}")
        apply(cfg, values)
    if overrides:
        apply(cfg, parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides))
    return cfg.validate()


def field_help() -> dict[str, tuple[Any, str]]:
    """name -> (default, the comment beside the field in TrainConfig's source): what ``--help`` prints."""
    import inspect
    import re

    comments: dict[str, str] = {}
    try:
        lines = inspect.getsource(TrainConfig).splitlines()
    except (OSError, TypeError):  # no source shipped: defaults only
        lines = []
    for line in lines:
        m = re.match(r"\s{4}(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    defaults = TrainConfig()
    return {
        f.name: (getattr(defaults, f.name), comments.get(f.name, "")) for f in dataclasses.fields(TrainConfig)
    }
