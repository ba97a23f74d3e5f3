"""The training loop: pretraining and fine-tuning (full, LoRA, state) of RWKV-4 / Eagle / Finch.

One optimiser step = ``accum_steps`` micro-batches of ``micro_bsz`` crops of ``ctx_len`` tokens per
process. Each crop runs through the chunked parallel WKV; with ``chunk_len > 0`` a crop is cut into
chunks that run one after the other, each starting from the previous chunk's final state with its
gradient cut (infinite-context training: memory depends on ``chunk_len``, not ``ctx_len``). Every
chunk is backpropagated at once, weighted by its share of the tokens. Then gradients are clipped to
norm ``grad_clip`` and AdamW steps with RWKV-LM's groups and schedule (``optim.py``). bf16 autocast
on CUDA (master weights fp32), optional gradient checkpointing of every block.

Outputs in ``out_dir``: ``rwkv-<step>.pth`` and ``rwkv-final.pth`` (official layout, bf16, atomic;
LoRA runs save the merged model, state runs ``state-<step>.pth`` + ``.state``), ``train_state.pt``
(fp32 weights, optimiser, step: what ``resume`` continues from), ``metrics.jsonl`` and
``loss.png``. Data order is a pure function of (seed, step), so a resumed run replays exactly what
an uninterrupted one would have seen.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_torch_save
from . import distributed as D
from .config import TrainConfig
from .data import TokenDataset, global_index, read_tokens, split_train_val, val_batches
from .optim import L2Wrap, lr_at, make_optimizer, set_lr


def _vocab_size(cfg: TrainConfig) -> int:
    if cfg.vocab:
        from rwkvkit.tokenizer.vocab import load_vocab

        n = len(load_vocab(cfg.vocab))
        if cfg.vocab_size and cfg.vocab_size < n:
            raise ValueError(f"vocab_size {cfg.vocab_size} is smaller than the vocab file's {n} ids")
        return cfg.vocab_size or n
    return cfg.vocab_size or 65536


def build_model(cfg: TrainConfig) -> nn.Module:
    """A fresh model with RWKV-LM's init, or ``cfg.load`` opened for training (fp32, ln0 kept)."""
    import rwkvkit
    from rwkvkit.config import ModelConfig
    from rwkvkit.models import RWKV

    from .init import init_weights

    if cfg.load:
        return rwkvkit.load(cfg.load, dtype=torch.float32, fold_ln0=False)
    mc = ModelConfig(
        cfg.version,
        cfg.n_layer,
        cfg.n_embd,
        _vocab_size(cfg),
        head_size=cfg.n_embd if cfg.version == 4 else cfg.head_size,
        ffn_dim=cfg.ffn_dim,
        mix_lora=cfg.mix_lora,
        decay_lora=cfg.decay_lora,
    )
    return init_weights(RWKV(mc), seed=cfg.seed)


class Trainer:
    """``Trainer(cfg).fit(resume=False)`` runs the whole loop and returns a summary dict."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg.validate()
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
        payload = torch.load(path, map_location="cpu", weights_only=False)
        if payload.get("format") != "rwkvkit-train-1":
            raise ValueError(f"{path} is not an rwkvkit training state")
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

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict:
        from .metrics import MetricsLog

        cfg, ctx = self.cfg, self.ctx
        resumed = self.load_train_state() if resume else False
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
