"""The training loop: pretraining and fine-tuning (full, LoRA, state) of every registered RWKV version.

One optimiser step = ``accum_steps`` micro-batches of ``micro_bsz`` crops of ``ctx_len`` tokens per
process. Each crop runs through the chunked parallel WKV; with ``chunk_len > 0`` a crop is cut into
chunks that run one after the other, each starting from the previous chunk's final state with its
gradient cut (infinite-context training: memory depends on ``chunk_len``, not ``ctx_len``). Every
chunk is backpropagated at once, weighted by its share of the tokens. Then gradients are clipped to
norm ``grad_clip`` and AdamW steps with RWKV-LM's groups and schedule (``optim.py``). bf16 autocast
on CUDA (master weights fp32), optional gradient checkpointing of every block.

Outputs in ``out_dir``: ``rwkv-<step>.pth`` and ``rwkv-final.pth`` (official layout, bf16, atomic;
LoRA runs save the merged model, state runs ``state-<step>.pth`` + ``.state``; ``keep_last`` keeps
only the newest numbered ones), ``vocab.txt`` (a copy of ``vocab``, so every command finds the
model's vocabulary beside it), ``train_state.pt`` (fp32 weights, optimiser, step, config: what
``resume`` continues from; read back with ``weights_only=True``), ``metrics.jsonl`` and ``loss.png``.
Data order is a pure function of (seed, step), so a resumed run replays exactly what an
uninterrupted one would have seen.

A run folder is never clobbered by accident (``prepare``): starting without ``resume`` where a run
already is refuses unless ``overwrite`` (which removes the old run's files first); ``resume`` without
a saved state refuses; a resume says which step it continues from, refuses a changed architecture
and names every other changed setting; the checkpoint of the resumed step is exported if a kill
came between saving the state and exporting it; ``*.tmp`` leftovers of killed writes are removed.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_torch_save, atomic_write, safe_torch_load
from . import distributed as D
from .config import TrainConfig
from .data import TokenDataset, global_index, read_tokens, split_train_val, val_batches
from .optim import L2Wrap, lr_at, make_optimizer, set_lr


def _vocab_size(cfg: TrainConfig) -> int:
    given = cfg.model.vocab_size
    if cfg.vocab:
        from rwkvkit.tokenizer.vocab import load_vocab

        n = len(load_vocab(cfg.vocab))
        if given and given < n:
            raise ValueError(f"model.vocab_size {given} is smaller than the vocab file's {n} ids")
        return given or n
    return given or 65536


def build_model(cfg: TrainConfig) -> nn.Module:
    """A fresh model with RWKV-LM's init, or ``cfg.load`` opened for training (fp32, ln0 kept)."""
    import rwkvkit
    from rwkvkit.models import RWKV

    from .init import init_weights

    if cfg.load:
        return rwkvkit.load(cfg.load, dtype=torch.float32, fold_ln0=False)
    return init_weights(RWKV(cfg.model.build(_vocab_size(cfg))), seed=cfg.seed)


class Trainer:
    """``Trainer(cfg).fit(resume=False)`` runs the whole loop and returns a summary dict."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg.validate()
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"device {cfg.device!r} but CUDA is not available to this PyTorch; use device: cpu"
            )
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.ctx = D.setup(cfg.strategy, cfg.device)
        self.out = Path(cfg.out_dir)
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg).to(self.ctx.device)
        model.gradient_checkpointing = cfg.grad_checkpoint
        self.tuned = None
        if cfg.mode == "lora":
            from .lora import add_lora

            add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
        elif cfg.mode == "state":
            from .state_tune import freeze_for_state_tuning

            self.tuned = freeze_for_state_tuning(model)
        self.base = model
        self.model = D.wrap(model, self.ctx)
        self.V = model.config.vocab_size
        if self.ctx.device.type == "cpu":
            _tune_malloc_for(cfg.micro_bsz * (cfg.chunk_len or cfg.ctx_len) * self.V * 4)
        tokens = read_tokens(cfg.data)
        if cfg.val_data:
            train, val = tokens, read_tokens(cfg.val_data)
        else:
            train, val = split_train_val(tokens, cfg.val_fraction, cfg.ctx_len)
        self.data = TokenDataset(train, cfg.ctx_len, cfg.seed, self.V)
        self.val = val_batches(val, cfg.ctx_len, cfg.micro_bsz, cfg.eval_batches) if len(val) else []
        named = list(self.model.named_parameters())
        if self.tuned is not None:
            named = [("time_state", self.tuned.time_state)]
        self.params = [p for _, p in named if p.requires_grad]
        self.opt = make_optimizer(named, cfg)
        self.engine = None
        if self.ctx.strategy == "deepspeed":
            if cfg.chunk_len:
                raise ValueError("strategy deepspeed takes one backward per micro-batch: use chunk_len=0")
            self.engine = D.deepspeed_engine(
                self.model, self.opt, cfg.grad_clip, cfg.micro_bsz, cfg.accum_steps
            )
        self.step = 0
        self.tokens_seen = 0
        self.autocast = self._autocast_dtype()
        self._prepared: bool | None = None  # None until prepare(); then whether it resumed

    # ---- pieces ---------------------------------------------------------------------------------
    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == "bf16" or (p == "auto" and self.ctx.device.type == "cuda"):
            return torch.bfloat16
        return None

    def _forward(self, model: nn.Module, x: torch.Tensor, state):
        if self.autocast is None:
            return model(x, state, backend=self.cfg.backend)
        with torch.autocast(self.ctx.device.type, dtype=self.autocast):
            return model(x, state, backend=self.cfg.backend)

    def _initial_state(self, batch: int):
        return self.tuned.initial(batch) if self.tuned is not None else None

    def _chunks(self, T: int) -> list[tuple[int, int]]:
        c = self.cfg.chunk_len or T
        return [(s, min(s + c, T)) for s in range(0, T, c)]

    def train_micro(self, x: torch.Tensor, y: torch.Tensor, weight: float, sync: bool) -> float:
        """Forward + backward of one micro-batch (chunk by chunk); returns its mean loss."""
        T = x.shape[1]
        state = self._initial_state(x.shape[0])
        spans = self._chunks(T)
        total = 0.0
        for j, (a, b) in enumerate(spans):
            last = sync and j == len(spans) - 1
            with D.no_sync(self.model, skip=not last and self.engine is None):
                logits, new_state = self._forward(self.engine or self.model, x[:, a:b], state)
                loss = F.cross_entropy(logits.float().reshape(-1, self.V), y[:, a:b].reshape(-1))
                if self.cfg.l2wrap > 0:
                    loss = L2Wrap.apply(loss, logits, self.cfg.l2wrap)
                if self.engine is not None:  # DeepSpeed divides by its accumulation steps itself
                    self.engine.backward(loss)
                else:
                    (loss * (weight * (b - a) / T)).backward()
            state = new_state.detach()
            total += loss.item() * (b - a) / T
        return total

    def optimizer_step(self) -> tuple[float, float]:
        """One optimiser step over ``accum_steps`` micro-batches; returns (mean loss, grad norm)."""
        cfg, ctx = self.cfg, self.ctx
        lr = lr_at(self.step, cfg)
        set_lr(self.opt, lr)
        self.model.train()
        losses = []
        for micro in range(cfg.accum_steps):
            g = global_index(self.step, micro, cfg.accum_steps, ctx.rank, ctx.world, cfg.micro_bsz)
            x, y = self.data.batch(g, cfg.micro_bsz)
            x, y = x.to(ctx.device), y.to(ctx.device)
            losses.append(self.train_micro(x, y, 1.0 / cfg.accum_steps, sync=micro == cfg.accum_steps - 1))
            if self.engine is not None:
                self.engine.step()  # steps the optimiser only at accumulation boundaries
        if self.engine is not None:
            norm = float(self.engine.get_global_grad_norm() or float("nan"))
        else:
            norm = float("nan")
            if self.tuned is not None:
                D.average_grads(self.params, ctx)
            if cfg.grad_clip > 0:
                n = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                norm = float(n.full_tensor() if hasattr(n, "full_tensor") else n)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += cfg.accum_steps * cfg.micro_bsz * cfg.ctx_len * ctx.world
        return D.all_mean(sum(losses) / len(losses), ctx), norm

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the fixed validation windows (same on every process)."""
        if not self.val:
            return None
        self.model.eval()
        tot, n = 0.0, 0
        model = self.engine or self.model
        for x, y in self.val:
            x, y = x.to(self.ctx.device), y.to(self.ctx.device)
            state = self._initial_state(x.shape[0])
            for a, b in self._chunks(x.shape[1]):
                logits, state = self._forward(model, x[:, a:b], state)
                tot += F.cross_entropy(
                    logits.float().reshape(-1, self.V), y[:, a:b].reshape(-1), reduction="sum"
                ).item()
                n += y[:, a:b].numel()
        self.model.train()
        return tot / n

    # ---- checkpoints ----------------------------------------------------------------------------
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
        if self.tuned is not None:
            from .state_tune import export_state

            path, _ = export_state(self.tuned, self.out / f"state-{name}.pth")
            return path
        if self.cfg.mode == "lora":
            sd = _merge_lora_sd(sd)
        path = self.out / f"rwkv-{name}.pth"
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
                if p.is_file():
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
            old = _run_files(self.out)
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
        if self.ctx.is_main and self.cfg.vocab:
            src = Path(self.cfg.vocab)
            atomic_write(self.out / "vocab.txt", lambda tmp: shutil.copyfile(src, tmp))
        if resumed and not self._export_path(str(self.step)).is_file():
            self.export(str(self.step))  # killed between saving the state and exporting this step
        self._prepared = resumed
        return resumed

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> dict:
        from .metrics import MetricsLog

        cfg, ctx = self.cfg, self.ctx
        resumed = self.prepare(resume, overwrite)
        log = MetricsLog(self.out, enabled=ctx.is_main, keep_upto=self.step if resumed else 0)
        bar = None
        if ctx.is_main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True)
        t0, tok0, last_val = time.time(), self.tokens_seen, None
        stop_reason = "max_steps"
        try:
            while self.step < cfg.max_steps:
                t_step = time.time()
                loss, norm = self.optimizer_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}")
                elapsed = time.time() - t0
                tok_s = (self.tokens_seen - tok0) / max(elapsed, 1e-9)
                rec = {
                    "step": self.step,
                    "loss": loss,
                    "lr": lr_at(self.step - 1, cfg),
                    "grad_norm": norm,
                    "tokens": self.tokens_seen,
                    "tok_s": tok_s,
                    "step_s": time.time() - t_step,
                }
                at_end = self.step >= cfg.max_steps
                out_of_time = cfg.max_minutes > 0 and D.broadcast_flag(elapsed > cfg.max_minutes * 60, ctx)
                out_of_time = out_of_time or (cfg.stop_at_step > 0 and self.step >= cfg.stop_at_step)
                if cfg.eval_every > 0 and self.step % cfg.eval_every == 0 or at_end or out_of_time:
                    last_val = self.evaluate()
                    if last_val is not None:
                        rec["val_loss"] = last_val
                if ctx.is_main and (self.step % cfg.log_every == 0 or "val_loss" in rec):
                    log.write(rec)
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
                    if last_val is not None:
                        post["val"] = f"{last_val:.3f}"
                    bar.set_postfix(post)
                if cfg.save_every > 0 and self.step % cfg.save_every == 0 or at_end or out_of_time:
                    self.save_train_state()
                    self.export(str(self.step))
                    self.prune_checkpoints()
                    log.plot()
                if out_of_time and not at_end:
                    stop_reason = (
                        "stop_at_step"
                        if cfg.stop_at_step and self.step >= cfg.stop_at_step
                        else "max_minutes"
                    )
                    break
            final = self.export("final")
        finally:
            if bar is not None:
                bar.close()
            D.teardown(ctx)
        log.plot()
        return {
            "step": self.step,
            "tokens": self.tokens_seen,
            "val_loss": last_val,
            "checkpoint": final,
            "stopped": stop_reason,
            "resumed": resumed,
        }


def _tune_malloc_for(logits_bytes: int) -> bool:
    """glibc thresholds sized to one micro-batch's fp32 logits, so that they, their gradient and the
    other activations are reused from the heap step after step instead of mapped and page-faulted in
    afresh (``rwkvkit.runtime``): a fifth of a V=65536 CPU step went to page faults."""
    from rwkvkit.kernels import MALLOC_TUNE
    from rwkvkit.runtime import tune_malloc

    if not MALLOC_TUNE:  # RWKVKIT_MALLOC_TUNE=0
        return False
    mb = 1 << 20
    return tune_malloc(
        mmap_threshold=min(max(2 * logits_bytes, 64 * mb), 1024 * mb),
        trim_threshold=min(max(8 * logits_bytes, 256 * mb), 2**31 - 1),
    )


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


def _run_files(out: Path) -> list[Path]:
    """The files of a training run in ``out`` (what --overwrite removes)."""
    if not out.is_dir():
        return []
    names = ("train_state.pt", "metrics.jsonl", "loss.png", "vocab.txt")
    files = [out / n for n in names if (out / n).is_file()]
    for pattern in ("rwkv-*.pth", "state-*.pth", "state-*.state"):
        files += sorted(out.glob(pattern))
    # vocab.txt alone is not a run (a user may put the vocabulary there first)
    return files if any(p.name != "vocab.txt" for p in files) else []


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
