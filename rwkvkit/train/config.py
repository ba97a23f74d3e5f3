"""TrainConfig: every choice of a training run, read from YAML and overridden from the command line.

One dataclass, one comment per field, grouped as model / data / optimisation / runtime / fine-tuning.
The model is a section of its own (``ModelSection``: the fields of ``rwkvkit.config.ModelConfig``,
which checks them, plus the version's own sizes such as Finch's ``mix_lora``), nested in YAML::

    model: {version: 7, n_layer: 2, n_embd: 64, head_size: 32}

and reached with a dot on the command line (``model.n_layer=4``). Flat model keys at the top level
(the layout before the section existed: ``version: 6``, ``n_layer: 2``) are refused with a message
that shows the nested form. ``load_config(path, overrides)`` reads a YAML mapping (unknown keys are
an error that names them) and applies ``key=value`` overrides whose values are parsed as YAML scalars
(``lr_init=3e-4``, ``grad_checkpoint=true``, ``mode=lora``). ``validate()`` checks ranges and
combinations (the model section by building its ``ModelConfig``) and raises ``ValueError`` naming the
field. Nothing here names a version: what a version has is the registry's to say.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from rwkvkit.config import ModelConfig

MODES = ("full", "lora", "state")
SCHEDULES = ("cosine", "exp", "constant")
STRATEGIES = ("auto", "single", "ddp", "fsdp", "deepspeed")
PRECISIONS = ("auto", "fp32", "bf16")
NO_GRAD_BACKENDS = ("native",)  # WKV backends of inference only (the C kernels take no gradient)


@dataclass
class ModelSection:
    """``TrainConfig.model``: the architecture a run pretrains (ignored when ``load`` gives a checkpoint,
    whose shapes decide). ``build(vocab_size)`` makes the ``rwkvkit.config.ModelConfig``."""

    version: int = 6  # a registered RWKV version: 4, 5 (Eagle), 6 (Finch), 7 (Goose)
    n_layer: int = 2  # number of blocks L
    n_embd: int = 64  # model width C (a multiple of head_size where the version has heads)
    head_size: int = 64  # head size N (ignored by versions without heads: RWKV-4)
    vocab_size: int = 0  # 0: taken from the tokenizer vocab file (vocab), else 65536
    ffn_dim: int = 0  # channel-mix width; 0: the version's default
    sizes: dict[str, int] = field(default_factory=dict)  # the version's own sizes, written beside the
    #                                                      others (model.mix_lora=16); unset: its default

    def build(self, vocab_size: int) -> ModelConfig:
        """The ``ModelConfig`` of this section with ``vocab_size`` (ValueError naming what is wrong)."""
        from rwkvkit.config import ModelConfig
        from rwkvkit.models import registry

        spec = registry.get(self.version)
        alien = sorted(set(self.sizes) - set(spec.sizes))
        if alien:
            own = ", ".join(f"model.{n}" for n in spec.sizes) or "none"
            raise ValueError(f"model.{alien[0]} is not a size of {spec.name} (its own sizes: {own})")
        return ModelConfig(
            self.version, self.n_layer, self.n_embd, vocab_size,
            head_size=self.head_size, ffn_dim=self.ffn_dim, **self.sizes,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The section as written in YAML: the fields, then the version's sizes beside them."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "sizes"}
        return out | dict(self.sizes)

    def update(self, values: dict[str, Any], where: str = "model") -> ModelSection:
        """Set keys of the section (sizes included) from a mapping; ValueError for a non-integer value."""
        if not isinstance(values, dict):
            raise ValueError(
                f"TrainConfig.{where} must be a mapping (model: {{version: 6, ...}}), got {values!r}"
            )
        for key, value in values.items():
            key = str(key).replace("-", "_")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"TrainConfig.model.{key} must be int, got {value!r}")
            if key in _MODEL_FIELDS:
                setattr(self, key, value)
            else:
                if key not in _all_sizes():
                    known = sorted([*_MODEL_FIELDS, *_all_sizes()])
                    raise ValueError(f"unknown model option model.{key}; known: {known}")
                self.sizes[key] = value
        return self


_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSection) if f.name != "sizes")


def _all_sizes() -> set[str]:
    from rwkvkit.models import registry

    return registry.all_sizes()


@dataclass
class TrainConfig:
    # ---- model ----
    model: ModelSection = field(default_factory=ModelSection)  # model.<key>: see ModelSection (--help)
    # ---- data ----
    data: str = ""  # token file: binidx prefix, .npy / .bin of token ids (0 ends each document)
    vocab: str = ""  # vocabulary file of the data's ids (sets model.vocab_size; copied to out_dir/vocab.txt)
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

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):  # TrainConfig(model={"version": 7, "n_layer": 2})
            self.model = ModelSection().update(self.model)

    def validate(self) -> TrainConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        if not self.load:  # with a checkpoint its shapes decide
            for name, value in self.model.to_dict().items():  # 0: the version's default or the vocab's
                if name != "version":  # an unknown version is the registry's to name
                    need(value >= 0, f"model.{name} must be >= 0, got {value!r}")
            try:
                self.model.build(self.model.vocab_size or 65536)
            except (ValueError, TypeError) as e:
                raise ValueError(f"TrainConfig: {e}") from None
        for name in ("ctx_len", "micro_bsz", "accum_steps", "max_steps"):
            need(int(getattr(self, name)) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        need(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        need(
            self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}"
        )
        need(self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        from rwkvkit.models.model import BACKENDS  # the model's WKV backends (GPU kernels add theirs)

        trainable = tuple(b for b in BACKENDS if b not in NO_GRAD_BACKENDS)
        need(
            self.backend in trainable,
            f"backend must be one of {trainable} to train"
            + (f" ({self.backend!r} runs without gradients)" if self.backend in BACKENDS else "")
            + f", got {self.backend!r}",
        )
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("lr_init", "lr_final"):
            lr = getattr(self, name)
            need(math.isfinite(lr) and lr > 0, f"{name} must be a positive number, got {lr!r}")
            need(lr <= 1, f"{name} {lr:g} is above 1: far too large for Adam (typical: 1e-5 .. 1e-3)")
        for name in ("weight_decay", "grad_clip", "l2wrap", "max_minutes"):
            value = getattr(self, name)  # 0 disables each
            need(math.isfinite(value) and value >= 0, f"{name} must be a number >= 0, got {value!r}")
        for name in ("threads", "eval_every", "save_every", "stop_at_step"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("eval_batches", "log_every"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            need(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        need(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps!r}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        need(0 <= self.warmup_steps <= self.max_steps, "warmup_steps must be in [0, max_steps]")
        need(self.chunk_len >= 0, "chunk_len must be >= 0")
        need(
            self.mode == "full" or bool(self.load), f"mode {self.mode!r} needs load=<checkpoint to fine-tune>"
        )
        need(self.lora_r > 0, "lora_r must be positive")
        need(self.keep_last >= 0, f"keep_last must be >= 0, got {self.keep_last!r}")
        need(bool(self.data), "data=<token file> is required")
        return self

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["lora_targets"] = list(self.lora_targets)
        return out | {"model": self.model.to_dict()}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# the model keys of the flat layout (before TrainConfig had a model section), refused with a hint
_FLAT_MODEL_KEYS = (*_MODEL_FIELDS, "mix_lora", "decay_lora")


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
    """Set fields from a mapping: ``model`` (a mapping, merged key by key) and ``model.<key>`` go to the
    model section; flat model keys are refused with the nested form they belong in."""
    flat = [k for k in values if k in _FLAT_MODEL_KEYS or k in _all_sizes()]
    if flat:
        nested = ", ".join(f"{k}: {values[k]}" for k in flat)
        raise ValueError(
            f"model options go in the model section now: {', '.join(flat)} (in YAML: model: {{{nested}}}; "
            f"on the command line: {' '.join(f'model.{k}={values[k]}' for k in flat)})"
        )
    unknown = sorted(k for k in values if k not in _FIELDS and not k.startswith("model."))
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(_FIELDS)}")
    for k, v in values.items():
        if k == "model":
            cfg.model.update(v)
        elif k.startswith("model."):
            cfg.model.update({k[len("model.") :]: v})
        else:
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
    """name -> (default, the comment beside the field in the source): what ``--help`` prints. The model
    section's keys come as ``model.<key>``, the versions' own sizes listed with who declares them
    (default None: the version's own)."""
    from rwkvkit.models import registry

    out: dict[str, tuple[Any, str]] = {}
    model = _comments(ModelSection)
    for name in _MODEL_FIELDS:
        out[f"model.{name}"] = (getattr(ModelSection(), name), model.get(name, ""))
    for size in sorted(registry.all_sizes()):
        owners = [s for s in registry.VERSIONS.values() if size in s.sizes]
        by = ", ".join(f"{s.short} (v{s.version})" for s in owners)
        out[f"model.{size}"] = (None, f"a size of {by}, for that version only")
    top = _comments(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name != "model":
            out[f.name] = (getattr(defaults, f.name), top.get(f.name, ""))
    return out


def _comments(cls: type) -> dict[str, str]:
    """field name -> the comment beside it in ``cls``'s source ({} when no source is shipped)."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    found = {}
    for line in lines:
        m = re.match(r"\s{4}(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found
