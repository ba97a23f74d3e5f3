"""The training loop: pretraining and fine-tuning (full, LoRA, state) of every registered RWKV version.

One optimiser step = ``accum_steps`` micro-batches of ``micro_bsz`` crops of ``ctx_len`` tokens per
process. Each crop runs through the chunked parallel WKV; with ``chunk_len > 0`` a crop is cut into
chunks that run one after the other, each starting from the previous chunk's final state with its
gradient cut (infinite-context training: memory depends on ``chunk_len``, not ``ctx_len``). Every
chunk is backpropagated at once, weighted by its share of the tokens. Then gradients are clipped to
norm ``grad_clip`` and AdamW steps with RWKV-LM's groups and schedule (``optim.py``). A step whose
loss or gradient norm is not finite raises ``Diverged`` before the optimiser runs, so the weights
and every file saved from them stay finite. bf16 autocast on CUDA (master weights fp32), optional
gradient checkpointing of every block.

Outputs in ``out_dir``: ``rwkv-<step>.pth`` and ``rwkv-final.pth`` (official layout, bf16, atomic;
LoRA runs save the merged model, state runs ``state-<step>.pth`` + ``.state``; ``keep_last`` keeps
only the newest numbered ones), ``vocab.txt`` (a copy of ``vocab``, so every command finds the
model's vocabulary beside it; a fine-tune without ``vocab`` carries the one beside the loaded
checkpoint), ``train_state.pt`` (fp32 weights, optimiser, step, config: what ``resume`` continues
from; read back with ``weights_only=True``), ``metrics.jsonl`` and ``loss.png``.
Data order is a pure function of (seed, step), so a resumed run replays exactly what an
uninterrupted one would have seen.

A run folder is never clobbered by accident (``prepare``, in ``run_dir.py`` with the checkpoints): starting without ``resume`` where a run
already is refuses unless ``overwrite`` (which removes the old run's files first); ``resume`` without
a saved state refuses; a resume says which step it continues from, refuses a changed architecture
and names every other changed setting; the checkpoint of the resumed step is exported if a kill
came between saving the state and exporting it; ``*.tmp`` leftovers of killed writes are removed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as D
from .config import TrainConfig
from .data import TokenDataset, check_ids, global_index, read_tokens, split_train_val, val_batches
from .optim import L2Wrap, lr_at, make_optimizer, set_lr
from .run_dir import RunDir


def _vocab_size(cfg: TrainConfig) -> int:
    given = cfg.model.vocab_size
    if cfg.vocab:
        from rwkvkit.tokenizer.vocab import load_vocab

        n = len(load_vocab(cfg.vocab))
        if given and given < n:
            raise ValueError(f"model.vocab_size {given} is smaller than the vocab file's {n} ids")
        return given or n
    return given or 65536


def run_vocab(cfg: TrainConfig, vocab_size: int) -> Path | None:
    """The vocabulary file a run copies to ``out_dir/vocab.txt``: ``vocab`` (with ``load``, refused
    when it has more ids than the loaded model's ``vocab_size``), else the one beside the loaded
    checkpoint (``<stem>.vocab.txt`` or ``vocab.txt``, as ``rwkvkit.model_args.find_vocab`` looks), else
    None."""
    if cfg.vocab:
        if cfg.load:
            from rwkvkit.tokenizer.vocab import load_vocab

            n = len(load_vocab(cfg.vocab))
            if n > vocab_size:
                raise ValueError(
                    f"vocabulary file {cfg.vocab!r} has {n} ids, more than the {vocab_size} of the model "
                    f"in {cfg.load!r}: fine-tune with the vocabulary it was trained with"
                )
        return Path(cfg.vocab)
    if cfg.load:
        from rwkvkit.model_args import find_vocab

        try:
            return find_vocab(cfg.load, vocab_size)
        except ValueError:  # none beside it (generate will ask for --vocab, as for the base model)
            return None
    return None


def build_model(cfg: TrainConfig) -> nn.Module:
    """A fresh model with RWKV-LM's init, or ``cfg.load`` opened for training (fp32, ln0 kept)."""
    import rwkvkit
    from rwkvkit.models import RWKV

    from .init import init_weights

    if cfg.load:
        return rwkvkit.load(cfg.load, dtype=torch.float32, fold_ln0=False)
    return init_weights(RWKV(cfg.model.build(_vocab_size(cfg))), seed=cfg.seed)


class Diverged(FloatingPointError):
    """A step whose loss or gradient norm is not finite. ``optimizer_step`` raises it before the
    optimiser runs, so the weights, and everything saved from them, stay finite; ``fit`` adds the
    last checkpoint it saved (``last_good``)."""

    def __init__(
        self, step: int, loss: float, norm: float, lr_init: float, last_good: Path | None = None
    ) -> None:
        self.step, self.loss, self.norm, self.lr_init = step, loss, norm, lr_init
        saved = (
            f"the last good checkpoint is {last_good} (--resume with a lower lr_init continues from it)"
            if last_good is not None
            else "no checkpoint was saved"
        )
        super().__init__(
            f"training diverged at step {step}: loss {loss:.4g}, gradient norm {norm:.4g} (not finite, "
            f"so the weights were not updated); lower lr_init (now {lr_init:g}); {saved}"
        )


class Trainer(RunDir):
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
        self.vocab_file = run_vocab(cfg, self.V)
        if self.ctx.device.type == "cpu":
            _tune_malloc_for(cfg.micro_bsz * (cfg.chunk_len or cfg.ctx_len) * self.V * 4)
        tokens = read_tokens(cfg.data)
        check_ids(tokens, self.V, f"token file {cfg.data!r}")  # all of it: the validation tail too
        if cfg.val_data:
            train, val = tokens, read_tokens(cfg.val_data)
            check_ids(val, self.V, f"validation token file {cfg.val_data!r}")
        else:
            train, val = split_train_val(tokens, cfg.val_fraction, cfg.ctx_len)
        self.data = TokenDataset(train, cfg.ctx_len, cfg.seed)  # its ids checked above
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
        loss = D.all_mean(sum(losses) / len(losses), ctx)
        if self.engine is not None:
            norm = float(self.engine.get_global_grad_norm() or float("nan"))
        else:
            if self.tuned is not None:
                D.average_grads(self.params, ctx)
            if cfg.grad_clip > 0:  # the norm before clipping
                n = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            else:
                n = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
            norm = float(n.full_tensor() if hasattr(n, "full_tensor") else n)
            if not (math.isfinite(loss) and math.isfinite(norm)):  # the same on every process
                self.opt.zero_grad(set_to_none=True)
                raise Diverged(self.step + 1, loss, norm, cfg.lr_init)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += cfg.accum_steps * cfg.micro_bsz * cfg.ctx_len * ctx.world
        return loss, norm

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
        last_good = self._export_path(str(self.step)) if resumed else None
        stop_reason = "max_steps"
        try:
            while self.step < cfg.max_steps:
                t_step = time.time()
                try:
                    loss, norm = self.optimizer_step()
                except Diverged as e:
                    raise Diverged(e.step, e.loss, e.norm, e.lr_init, last_good) from None
                if not math.isfinite(loss):  # DeepSpeed's engine steps by itself: nothing is saved now
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
                    last_good = self._export_path(str(self.step))  # the same on every process
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
