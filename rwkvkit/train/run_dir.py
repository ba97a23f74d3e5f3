"""The run folder of ``rwkvkit.train.trainer.Trainer`` (``RunDir``, a base of the trainer): the exported
checkpoints (official bf16 layout, LoRA merged, or the tuned state) and ``keep_last``, the training
state ``train_state.pt`` (written atomically, read with ``weights_only=True``), and ``prepare``, which
refuses to clobber a run without ``overwrite``, to resume without a saved state, or to resume with a
changed architecture, names every other changed setting, removes ``*.tmp`` leftovers of killed writes
and exports the resumed step's checkpoint when a kill came between the state and the export.

It uses the trainer's attributes: ``cfg``, ``ctx`` (the distributed context), ``out``, ``model``,
``opt``, ``tuned`` (state tuning), ``step``, ``tokens_seen`` and ``_prepared``.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_torch_save, atomic_write, safe_torch_load
from . import distributed as D


class RunDir:
    """Checkpoints, the training state and the checks of a run folder (see the module docstring)."""

    cfg: Any
    ctx: Any
    out: Path
    model: Any
    opt: Any
    tuned: Any
    vocab_file: Path | None
    step: int
    tokens_seen: int
    _prepared: bool | None

    def _model_state(self) -> dict[str, torch.Tensor]:
        """Full (gathered) fp32 state dict of the trainable module; every process must call it."""
        if self.ctx.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return {k: v.detach().cpu() for k, v in D.unwrap(self.model).state_dict().items()}

    def _optim_state(self) -> dict:
        if self.ctx.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.model, self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.opt.state_dict()

    def export(self, name: str) -> Path | None:
        """Write the official bf16 checkpoint (or the tuned state) under ``name``; main process only."""
        from rwkvkit.checkpoint import save

        sd = self._model_state()
        if not self.ctx.is_main:
            return None
        path = self._export_path(name)
        with _writing(path):
            if self.tuned is not None:
                from .state_tune import export_state

                return export_state(self.tuned, path)[0]
            if self.cfg.mode == "lora":
                sd = _merge_lora_sd(sd)
            save(sd, path, dtype=torch.bfloat16)
        return path

    def _export_path(self, name: str) -> Path:
        return self.out / (f"state-{name}.pth" if self.tuned is not None else f"rwkv-{name}.pth")

    def prune_checkpoints(self) -> list[Path]:
        """Delete all but the ``keep_last`` newest numbered checkpoints (never ``*-final``); main only."""
        if self.cfg.keep_last <= 0 or not self.ctx.is_main:
            return []
        prefix = "state-" if self.tuned is not None else "rwkv-"
        steps = sorted(
            int(s) for p in self.out.glob(prefix + "*.pth") if (s := p.stem[len(prefix) :]).isdigit()
        )
        removed = []
        for s in steps[: -self.cfg.keep_last]:
            for p in (self.out / f"{prefix}{s}.pth", self.out / f"{prefix}{s}.state"):
                if p.is_file() and not _same_file(p, self.cfg.load):  # never the model it fine-tunes
                    p.unlink()
                    removed.append(p)
        return removed

    def save_train_state(self) -> None:
        model_sd = self._model_state()
        if self.tuned is not None:
            model_sd = {"time_state": self.tuned.time_state.detach().cpu()}
        optim_sd = self._optim_state()
        if not self.ctx.is_main:
            return
        payload = {
            "format": "rwkvkit-train-1",
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "model": model_sd,
            "optimizer": optim_sd,
            "config": self.cfg.to_dict(),
            "torch_rng": torch.get_rng_state(),
            "world": self.ctx.world,
        }
        with _writing(self.out / "train_state.pt"):
            atomic_torch_save(payload, self.out / "train_state.pt")

    def load_train_state(self) -> bool:
        path = self.out / "train_state.pt"
        if not path.is_file():
            return False
        payload = safe_torch_load(path, "training state", map_location="cpu")
        if not isinstance(payload, dict) or payload.get("format") != "rwkvkit-train-1":
            raise ValueError(f"{path} is not an rwkvkit training state")
        self._check_resumed_config(payload)
        if self.tuned is not None:
            with torch.no_grad():
                self.tuned.time_state.copy_(payload["model"]["time_state"])
            self.opt.load_state_dict(payload["optimizer"])
        elif self.ctx.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, payload["model"], options=opts)
            set_optimizer_state_dict(self.model, self.opt, payload["optimizer"], options=opts)
        else:
            D.unwrap(self.model).load_state_dict(payload["model"])
            self.opt.load_state_dict(payload["optimizer"])
        self.step, self.tokens_seen = int(payload["step"]), int(payload["tokens_seen"])
        torch.set_rng_state(payload["torch_rng"])
        return True

    def _check_resumed_config(self, payload: dict) -> None:
        """Refuse a changed architecture; name every other setting that differs from the saved run."""
        saved = payload.get("config")
        if not isinstance(saved, dict):
            raise ValueError("the training state has no saved config: it was not written by this trainer")
        saved, now = _flat_config(saved), _flat_config(self.cfg.to_dict())
        if saved.get("load") or now.get("load"):  # the checkpoint's shapes decide (a changed load is named)
            saved, now = _without_model(saved), _without_model(now)
        model_keys = {k for k in (*saved, *now) if k.startswith("model.")}  # a size set in one only differs
        changed = {
            k: (saved.get(k), now.get(k))
            for k in [*now, *sorted(model_keys - set(now))]
            if (k in saved or k in model_keys) and saved.get(k) != now.get(k) and k not in RUNTIME_KEYS
        }
        fixed = {k: v for k, v in changed.items() if k in STRUCTURE_KEYS or k.startswith("model.")}
        if fixed:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in fixed.items())
            raise ValueError(
                f"cannot resume {self.out}: the model or fine-tuning mode differs from the saved run ({what}); "
                "use the saved values, or start a new run in another out_dir"
            )
        world = payload.get("world", self.ctx.world)
        if world != self.ctx.world:
            changed["processes"] = (world, self.ctx.world)
        if changed and self.ctx.is_main:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            print(
                f"rwkvkit train: resuming with changed settings: {what} "
                "(the run no longer replays what an uninterrupted one would have done)",
                file=sys.stderr,
            )

    def prepare(self, resume: bool = False, overwrite: bool = False) -> bool:
        """Check and tidy ``out_dir`` before training; load the saved state when ``resume``. Returns
        whether it resumed. Raises ValueError (one line, naming the problem) where it must not go on."""
        if self._prepared is not None:
            return self._prepared
        if resume and overwrite:
            raise ValueError("--resume continues the run in out_dir and --overwrite discards it: pick one")
        state = self.out / "train_state.pt"
        if self.ctx.is_main:
            for tmp in list(self.out.glob("*.tmp")) + list(self.out.glob("*.tmp.png")):
                tmp.unlink(missing_ok=True)  # a write killed half-way (atomic writes rename when done)
        if resume:
            if not state.is_file():
                raise ValueError(
                    f"nothing to resume: {state} does not exist (start without --resume to begin a run there)"
                )
        else:
            old = run_files(self.out)
            if old and overwrite and any(_same_file(p, self.cfg.load) for p in old):
                raise ValueError(
                    f"--overwrite would delete {self.cfg.load}, the checkpoint this run loads from: copy it "
                    f"out of {self.out} first, or pick another out_dir"
                )
            old = [p for p in old if not _same_file(p, self.vocab_file)]  # the vocabulary it copies
            if old and not overwrite:
                names = ", ".join(p.name for p in old[:4]) + (", ..." if len(old) > 4 else "")
                raise ValueError(
                    f"{self.out} already holds a training run ({names}): continue it with --resume, or pass "
                    "--overwrite to discard it and start again"
                )
            D.barrier(self.ctx)  # every process has looked before the main one removes anything
            if old and self.ctx.is_main:
                for p in old:
                    p.unlink(missing_ok=True)
                print(f"rwkvkit train: --overwrite: removed {len(old)} files of the old run in {self.out}",
                      file=sys.stderr)  # fmt: skip
            D.barrier(self.ctx)  # ... and nobody writes before the removal is done
        resumed = self.load_train_state() if resume else False
        if resumed and self.ctx.is_main:
            print(
                f"rwkvkit train: resuming from step {self.step} of {self.cfg.max_steps} ({state})",
                file=sys.stderr,
            )
        src = self.vocab_file
        if self.ctx.is_main and src is not None and not _same_file(self.out / "vocab.txt", src):
            atomic_write(self.out / "vocab.txt", lambda tmp: shutil.copyfile(src, tmp))
        if resumed and not self._export_path(str(self.step)).is_file():
            self.export(str(self.step))  # killed between saving the state and exporting this step
        self._prepared = resumed
        return resumed


# Settings a resumed run may change silently (they do not change what is computed), and those it
# may not change at all (the saved weights or optimiser would not fit).
RUNTIME_KEYS = frozenset(
    {"threads", "progress", "max_minutes", "stop_at_step", "out_dir", "save_every", "eval_every",
     "eval_batches", "log_every", "keep_last", "device", "strategy", "grad_checkpoint"}
)  # fmt: skip
STRUCTURE_KEYS = frozenset({"mode", "load", "lora_r", "lora_targets"})  # and every model.<key>
_FLAT_MODEL_KEYS = ("version", "n_layer", "n_embd", "head_size", "vocab_size", "ffn_dim")


def _flat_config(cfg: dict) -> dict:
    """A saved or current config with its model section as ``model.<key>`` entries. A run saved before
    the section existed (flat ``version``, ``n_layer``, ... and Finch's two LoRA widths for every
    version) reads as the section it meant, so a changed architecture is still refused."""
    out = {k: v for k, v in cfg.items() if k != "model"}
    model = dict(cfg.get("model") or {})
    if "model" not in cfg and "version" in cfg:  # the flat layout
        from rwkvkit.models import registry

        model = {k: out.pop(k) for k in _FLAT_MODEL_KEYS if k in out}
        own = registry.VERSIONS[model["version"]].sizes if model.get("version") in registry.VERSIONS else {}
        for k in ("mix_lora", "decay_lora"):
            if k in out:
                value = out.pop(k)
                if k in own:
                    model[k] = value
    return out | {f"model.{k}": v for k, v in model.items()}


def _without_model(cfg: dict) -> dict:
    """A flat config without its ``model.<key>`` entries (ignored where a run loads a checkpoint)."""
    return {k: v for k, v in cfg.items() if not k.startswith("model.")}


def run_files(out: Path) -> list[Path]:
    """The files of a training run in ``out`` (what --overwrite removes): only names the trainer
    writes (``rwkv-<step>.pth``, ``rwkv-final.pth``, not a user's ``rwkv-best.pth``), and only where a
    run saved something (a checkpoint or ``train_state.pt``): the log and vocabulary of a run that
    failed before its first save are no run, and a fresh start reuses the folder."""
    if not out.is_dir():
        return []
    names = ("train_state.pt", "metrics.jsonl", "loss.png", "vocab.txt")
    files = [out / n for n in names if (out / n).is_file()]
    for prefix, suffix in (("rwkv-", ".pth"), ("state-", ".pth"), ("state-", ".state")):
        for p in sorted(out.glob(f"{prefix}*{suffix}")):
            step = p.name[len(prefix) : -len(suffix)]
            if step.isdigit() or step == "final":
                files.append(p)
    return files if any(p.suffix in (".pt", ".pth", ".state") for p in files) else []


def _same_file(p: Path, other: str | Path | None) -> bool:
    """Whether ``p`` and ``other`` (a path; None or "" for none) are one existing file."""
    if not other:
        return False
    try:
        return p.samefile(other)
    except OSError:
        return False


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write of ``path`` into an OSError of one line: why (the OS error, or PyTorch's
    short write, which is how a full disk shows), the space left, and that the files saved before it
    are intact (every write goes to a temporary file, renamed over the old one once complete)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, OSError) and e.strerror:
            why = e.strerror
        else:
            why = f"the write stopped short, is the disk full? (PyTorch: {' '.join(str(e).split())[:160]})"
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            free = ""
        raise OSError(f"could not write {path}: {why}{free}; the files saved before it are intact") from e


def _merge_lora_sd(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold ``X.lora_A`` / ``X.lora_B`` into ``X.weight`` in a plain state dict (scale stored alongside)."""
    out = {k: v for k, v in sd.items() if ".lora_" not in k and not k.endswith(".lora_scale")}
    for k in sd:
        if k.endswith(".lora_A"):
            base = k[: -len(".lora_A")]
            A, B = sd[k].float(), sd[base + ".lora_B"].float()
            scale = float(sd[base + ".lora_scale"])
            out[base + ".weight"] = (sd[base + ".weight"].float() + scale * (B @ A)).to(
                sd[base + ".weight"].dtype
            )
    return out
