"""The RWKV language model: embedding, blocks of time-mix + channel-mix, output head.

One class serves every registered version (``registry.py``): the version's declarations
(``config.spec``) pick the time-mix and channel-mix modules once, at construction, and name the
recurrent state tensors the time-mix carries; ``forward`` has no version branches. Attribute names
equal the official checkpoint keys, so ``model.state_dict()`` *is* an official checkpoint.

``forward(tokens, state)`` is a pure function of its inputs: the incoming ``State`` is never modified,
a new one is returned, and passing it back continues the sequence exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from ..config import ModelConfig
from ..kernels import Kernels
from ..ops import fused
from ..state import State
from . import engine
from .common import LayerNorm, Linear, fusable

BACKENDS = ("auto", "chunked", "naive", "native")


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = LayerNorm(config.n_embd)
        self.ln1 = LayerNorm(config.n_embd)
        self.ln2 = LayerNorm(config.n_embd)
        self.att = config.spec.time_mix_for(config, layer_id)
        self.ffn = config.spec.channel_mix(config)

    def forward(
        self,
        x: torch.Tensor,
        att_shift: torch.Tensor,
        wkv: tuple[torch.Tensor, ...],
        ffn_shift: torch.Tensor,
        backend: str,
        keep: int = 0,
        carry: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """x [B, T, C] fp32 residual -> (x, att_shift, wkv, ffn_shift); ``wkv`` is the time-mix's
        recurrent state, the layer's tensors of the version's ``recurrent`` slots in their order.

        ``carry``: a dict the time-mixes of one call share from layer to layer (values a version passes
        down the layers within a token, such as RWKV-7's value residual; not part of the state).

        ``keep`` > 0: only the last ``keep`` positions of x are wanted (the last block of a
        ``last_only`` call): the channel-mix then runs on those alone. The state is unchanged by this.

        CPU inference (the fused kernels apply): ln1 comes out of one C pass with the time-mix's first
        token-shift mixes, the residual add with ln2 and the channel-mix's mixes, and the channel-mix
        adds its output to the residual in its last kernel; otherwise the plain PyTorch code below.
        """
        # (FSDP2 shards each time-mix and channel-mix separately and gathers their parameters only
        # inside their own forward: parameters read here, before it, must be plain tensors)
        spec = self.att.shift_mix_spec(x, att_shift, wkv)
        if spec is not None and fusable(self.ln1, x) and fused.plain(spec[0], self.ln1.weight, self.ln1.bias):
            # ln1 and the time-mix's first token-shift mixes in one C pass
            ln, (mix, lerp, dt) = self.ln1, spec
            _, mixed, last, xn = fused.add_norm_mix(
                x, None, ln.weight, ln.bias, ln.eps, att_shift, mix, lerp=lerp, dtype=dt, want_normed=True
            )
            out, _, wkv = self.att(xn, att_shift, wkv, backend, mixed=mixed, carry=carry)
            att_shift = last
        else:
            out, att_shift, wkv = self.att(self.ln1(x), att_shift, wkv, backend, carry=carry)
        ffn = self.ffn
        ln = self.ln2
        spec = ffn.shift_mix_spec(x, ffn_shift)
        if spec is not None and fusable(self, x, inputs=(out,)) and fused.plain(out, ln.weight, ln.bias):
            # the residual add, ln2 and the channel-mix's token-shift mixes in one C pass, and the
            # second residual add inside the channel-mix's last kernel
            if keep:
                x, out = x[:, -keep:], out[:, -keep:]
            mix, lerp, dt = spec
            x, mixed, ffn_shift, _ = fused.add_norm_mix(
                x, out, ln.weight, ln.bias, ln.eps, ffn_shift, mix, lerp=lerp, dtype=dt
            )
            return ffn.forward_mixed(mixed, residual=x), att_shift, wkv, ffn_shift
        x = x + out
        if keep:
            x = x[:, -keep:]  # the first kept position only supplies the token shift of the next
        out, ffn_shift = self.ffn(self.ln2(x), ffn_shift)
        return x + out, att_shift, wkv, ffn_shift


class RWKV(nn.Module):
    """An RWKV language model. Build with a ``ModelConfig``; load with ``rwkvkit.load``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.emb = nn.Embedding(config.vocab_size, C)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_out = LayerNorm(C)
        self.head = Linear(C, config.vocab_size)
        self.ln0_folded = False  # True once ln0 is folded into emb (inference loading, as the reference)
        self.rescale_every = 0  # fp16: halve x after every n-th block (weights scaled to match at load)
        self.gradient_checkpointing = False
        self.time_state: torch.Tensor | None = None  # [L, ...] state layout, from a state-tuned file
        self.kernels = Kernels.default()  # the fast CPU paths this model may take (set_kernels)
        self._native_step = None  # the version's native step (engine.NativeStep for Eagle and Finch)

    def _apply(self, fn, recurse=True):  # .to() / .float() / ...: tensors move, the plan goes
        self._native_step = None
        return super()._apply(fn, recurse)

    def set_kernels(self, kernels: Kernels | None = None, **changes: bool) -> RWKV:
        """Choose the fast CPU paths: a ``Kernels`` and/or changes to the current choice
        (``model.set_kernels(native_step=False)``). Returns the model."""
        self.kernels = (kernels or self.kernels).replace(**changes)
        return self

    def describe(self) -> str:
        """Which implementation each part of this model runs for CPU inference, and why a faster one
        does not (dtype, quantisation, the kernel choice, what is built, the CPU's features)."""
        from .report import describe

        return describe(self)

    def native_step(self) -> Any:
        """The one-call C decode step for this model as it is now (the version's: ``Version.native_step``),
        or None if it cannot take it."""
        ns = self._native_step
        if ns is not None and ns.valid():
            return ns
        try:
            self._native_step = self.config.spec.native_step(self)
        except engine.Unsupported:
            self._native_step = None
        return self._native_step

    # ---- state ----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        # the embedding is stored in the load dtype in every mode (int8 quantises only the matrices; an
        # int8 head's ``weight`` is its dequantised copy, float32 and costly to build)
        return self.emb.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.emb.weight.device

    def init_state(self, batch_size: int = 1) -> State:
        """The state at the start of a sequence: zeros, or the loaded ``time_state`` for every row."""
        st = State.zeros(self.config, batch_size, device=self.device)
        if self.time_state is not None:
            t = st.tensors[self.config.spec.time_state.slot]
            t.copy_(self.time_state.unsqueeze(1).expand_as(t))
        return st

    # ---- forward --------------------------------------------------------------------------------
    def _tokens(self, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor):
            # the values' own type decides (floats and bools are refused below, not truncated); a
            # NumPy array keeps its shape, a list of lists is a batch
            if hasattr(tokens, "__array__"):
                arr = np.asarray(tokens)
                tokens = torch.from_numpy(arr.astype(np.int64) if arr.dtype.kind in "iu" else np.array(arr))
            else:
                rows = list(tokens)
                if not rows:
                    raise ValueError("tokens is empty: need at least one token per row")
                try:
                    tokens = torch.tensor(rows if isinstance(rows[0], (list, tuple)) else [rows])
                except (RuntimeError, TypeError, ValueError, OverflowError) as e:
                    raise ValueError(f"tokens must be integer token ids: {e}") from None
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T] (or a list of ints), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8, torch.int64):
            raise ValueError(f"tokens must be integers, got {tokens.dtype}")
        if tokens.shape[1] == 0:
            raise ValueError("tokens is empty: need at least one token per row")
        lo, hi = (int(v) for v in torch.aminmax(tokens))
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return tokens.to(self.device, torch.long)

    def forward(
        self,
        tokens: torch.Tensor | Sequence[int],
        state: State | None = None,
        *,
        backend: str = "auto",
        last_only: bool = False,
    ) -> tuple[torch.Tensor, State]:
        """tokens [B, T] -> (logits [B, T, V] float32 (or [B, 1, V] if ``last_only``), new State).

        ``backend``: "auto" (the native C recurrence for CPU inference; otherwise the chunked
        parallel WKV for T > 1 and one recurrent step for T == 1), "chunked", "naive" (the fp32
        per-step loop, the source of truth) or "native" (the versions with a native WKV kernel).
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        with kernels.using(self.kernels):
            return self._forward(self._tokens(tokens), state, backend, last_only)

    def _forward(
        self, tokens: torch.Tensor, state: State | None, backend: str, last_only: bool
    ) -> tuple[torch.Tensor, State]:
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B)
        else:
            state.check(self.config, B)

        x = self.emb(tokens).float()  # [B, T, C]
        if not self.ln0_folded:
            x = self.blocks[0].ln0(x)
        if T == 1 and backend in ("auto", "native") and self._native_step_applies(x, state):
            step = self.native_step()
            if step is not None:
                logits, new_state = step.step(x[:, 0], state)
                return logits.unsqueeze(1), new_state
        st = state.tensors
        names = [slot.name for slot in self.config.spec.recurrent]
        att_shift, ffn_shift, wkv = [], [], []
        carry: dict = {}  # passed from layer to layer within this call (Block.forward)
        for i, block in enumerate(self.blocks):
            s_wkv = tuple(st[name][i] for name in names)
            # the last block of a last_only call: its channel-mix needs only the last two positions
            keep = 2 if last_only and T > 2 and i == len(self.blocks) - 1 else 0
            args = (x, st["att_shift"][i], s_wkv, st["ffn_shift"][i], backend, keep, carry)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, a, w, f = checkpoint(block, *args, use_reentrant=False)
            else:
                x, a, w, f = block(*args)
            if self.rescale_every and (i + 1) % self.rescale_every == 0:
                x = x / 2
            att_shift.append(a)
            ffn_shift.append(f)
            wkv.append(w)
        new = {"att_shift": torch.stack(att_shift).to(st["att_shift"].dtype)}
        new["ffn_shift"] = torch.stack(ffn_shift).to(st["ffn_shift"].dtype)
        for j, name in enumerate(names):
            new[name] = torch.stack([w[j] for w in wkv])
        if last_only:
            x = x[:, -1:]
        logits = self.head(self.ln_out(x)).float()
        return logits, State(self.config.version, new)

    def _native_step_applies(self, x: torch.Tensor, state: State) -> bool:
        if (
            x.device.type != "cpu"
            or not kernels.active().native_step
            or not self.config.spec.native_step_built()
        ):
            return False
        if not torch.is_grad_enabled():
            return True
        grads = any(t.requires_grad for t in state.tensors.values())
        return not grads and not any(p.requires_grad for p in self.parameters())

    def loss(
        self, tokens: torch.Tensor, targets: torch.Tensor, state: State | None = None, **kw
    ) -> torch.Tensor:
        """Mean next-token cross-entropy of ``targets`` [B, T] given ``tokens`` [B, T]."""
        logits, _ = self(tokens, state, **kw)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
