"""State tuning: train only the initial recurrent state of every layer (versions with a ``time_state``).

The model is frozen; one trainable tensor ``time_state`` [L, ...] (in the layout of the ``State``
tensor the version names, Eagle/Finch: ``wkv`` [L, H, N, N] key x value; Goose: value x key) becomes
the starting state of every sequence (token-shift states start at zero, as in RWKV-LM's state
tuning). Because the model's forward uses its incoming state differentiably,
the gradient reaches it through the chunked WKV. The result is exported both as
``blocks.{i}.att.time_state`` tensors (RWKV-LM's / RWKV-PEFT's file layout, [H, N, N] stored [value,
key] for every version, which ``rwkvkit.load`` and, for v5/v6, the ``rwkv`` package read next to a
checkpoint) and as an rwkvkit ``State`` file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from rwkvkit.state import State


class TunedState(nn.Module):
    """The trainable initial state; ``initial(batch_size)`` returns the ``State`` a batch starts from."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        cfg = model.config
        layout = cfg.spec.time_state
        if layout is None:
            from rwkvkit.models.registry import VERSIONS

            tunable = " or ".join(f"{s.short} (v{s.version})" for s in VERSIONS.values() if s.time_state)
            raise ValueError(f"state tuning needs an {tunable} model; {cfg.spec.name} has no matrix state")
        start = getattr(model, "time_state", None)
        if start is None:
            start = State.zeros(cfg, 1).tensors[layout.slot][:, 0]
        self.config, self.slot = cfg, layout.slot
        self.time_state = nn.Parameter(start.detach().float().clone().to(model.emb.weight.device))

    def initial(self, batch_size: int) -> State:
        st = State.zeros(self.config, batch_size, device=self.time_state.device)
        t = self.time_state.unsqueeze(1)
        st.tensors[self.slot] = t.expand(t.shape[0], batch_size, *t.shape[2:])
        return st

    def as_state(self) -> State:
        return State(self.config.version, {k: v.detach() for k, v in self.initial(1).tensors.items()})


def freeze_for_state_tuning(model: nn.Module) -> TunedState:
    """Freeze ``model`` and return the trainable initial state."""
    for p in model.parameters():
        p.requires_grad_(False)
    return TunedState(model)


def export_state(tuned: TunedState, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``path`` (``.pth``: the ``time_state`` keys, fp32) and ``path`` with ``.state`` suffix
    (an rwkvkit State file); both atomically. Returns the two paths."""
    from rwkvkit.checkpoint import save

    path = Path(path)
    sd = tuned.as_state().to_time_state()
    save(sd, path, dtype=torch.float32)
    state_path = path.with_suffix(".state")
    tuned.as_state().save(state_path)
    return path, state_path
