"""The recurrent state of an RWKV model as an explicit value.

A ``State`` holds, for every layer and batch row, what the model needs to continue a sequence:

- ``att_shift`` [L, B, C]: the previous token's normalised input to the time-mix (token shift)
- ``ffn_shift`` [L, B, C]: the previous token's normalised input to the channel-mix
- the time-mix's recurrent tensors, fp32, as the version declares them (``Version.recurrent``):
  Eagle/Finch ``wkv`` [L, B, H, N, N], the matrix-valued state per head laid out [key, value];
  RWKV-4 ``aa``, ``bb``, ``pp`` [L, B, C], numerator, denominator and running max exponent

Passing a state back to the model continues the sequence exactly. States can be cloned, moved,
saved to and loaded from a file (read without unpickling code and validated in full: version,
tensor types, consistent shapes, finite values), and split or stacked by batch row (for batched generation and for
caching the state of a shared prompt prefix). Every part is fp32, whatever the model's dtype (the
shifts too: they are the normalised inputs, which the model computes in fp32).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .io import atomic_torch_save, safe_torch_load

_FORMAT = "rwkvkit-state-1"


def state_keys(version: int) -> tuple[str, ...]:
    """The tensors of a state of ``version``, in file order (ValueError for an unknown version)."""
    from .models import registry

    return registry.get(version).state_names()


@dataclass
class State:
    version: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def zeros(
        cls,
        config: ModelConfig,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> State:
        """The state at the start of a sequence: the shifts zero, the recurrent tensors at the values the
        version declares (RWKV-4's ``pp`` = -1e30, everything else zero)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        L, B, C = config.n_layer, batch_size, config.n_embd
        t = {
            "att_shift": torch.zeros(L, B, C, device=device, dtype=dtype),
            "ffn_shift": torch.zeros(L, B, C, device=device, dtype=dtype),
        }
        for slot in config.spec.recurrent:
            t[slot.name] = torch.full(
                (L, B, *slot.shape(config)), slot.fill, device=device, dtype=torch.float32
            )
        return cls(config.version, t)

    @classmethod
    def from_time_state(cls, sd: dict[str, torch.Tensor], config: ModelConfig) -> State:
        """A state-tuned file's ``blocks.{i}.att.time_state`` keys (as RWKV-LM writes them: Eagle/Finch
        [H, N, N] stored [value, key]) as a batch-1 State: the recurrent tensor the version names set,
        the token-shift parts zero."""
        layout = _time_state_layout(config.version)
        st = cls.zeros(config, 1)
        target = st.tensors[layout.slot]
        shape = tuple(target.shape[2:])
        for i in range(config.n_layer):
            key = f"blocks.{i}.att.time_state"
            if key not in sd:
                raise ValueError(
                    f"state file lacks {key!r} (needs one time_state per layer, {config.n_layer} layers)"
                )
            t = sd[key]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{key!r} is not a floating-point tensor")
            if tuple(t.shape) != shape:
                raise ValueError(f"{key!r} has shape {tuple(t.shape)}, the model needs {shape}")
            t = t.float()
            target[i, 0] = t.transpose(-1, -2) if layout.transposed else t
        st.validate("time_state")
        return st

    def to_time_state(self) -> dict[str, torch.Tensor]:
        """The inverse of ``from_time_state`` for batch row 0 (what state tuning exports)."""
        layout = _time_state_layout(self.version)
        rec = self.tensors[layout.slot][:, 0]
        out = (t.transpose(-1, -2) if layout.transposed else t for t in rec)
        return {f"blocks.{i}.att.time_state": t.contiguous() for i, t in enumerate(out)}

    # ---- basic properties ---------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.tensors["att_shift"].shape[1]

    @property
    def n_layer(self) -> int:
        return self.tensors["att_shift"].shape[0]

    @property
    def device(self) -> torch.device:
        return self.tensors["att_shift"].device

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    # ---- value semantics ----------------------------------------------------------------------
    def clone(self) -> State:
        return State(self.version, {k: v.clone() for k, v in self.tensors.items()})

    def detach(self) -> State:
        return State(self.version, {k: v.detach() for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> State:
        """Move to ``device``; ``dtype`` applies to the shift tensors only (the WKV part stays fp32)."""
        out = {}
        for k, v in self.tensors.items():
            dt = dtype if (dtype is not None and k.endswith("shift")) else v.dtype
            out[k] = v.to(device=device if device is not None else v.device, dtype=dt)
        return State(self.version, out)

    def select(self, rows: int | Sequence[int] | torch.Tensor | slice) -> State:
        """A copy of the state of some batch rows (an int keeps a batch dimension of 1; negative
        indices count from the end, as in Python)."""
        if isinstance(rows, slice):
            rows = range(self.batch_size)[rows]
        if isinstance(rows, int):
            rows = [rows]
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device).reshape(-1)
        B = self.batch_size
        if idx.numel() and not (-B <= int(idx.min()) and int(idx.max()) < B):
            bad = int(idx.min()) if int(idx.min()) < -B else int(idx.max())
            raise IndexError(f"row {bad} is outside this state's batch of {B}")
        idx = idx % max(B, 1)
        return State(self.version, {k: v.index_select(1, idx) for k, v in self.tensors.items()})

    def split(self) -> list[State]:
        """One single-row state per batch row."""
        return [self.select(i) for i in range(self.batch_size)]

    @staticmethod
    def stack(states: Sequence[State]) -> State:
        """Concatenate states along the batch dimension."""
        if not states:
            raise ValueError("State.stack needs at least one state")
        version = states[0].version
        for s in states:
            if s.version != version or s.tensors.keys() != states[0].tensors.keys():
                raise ValueError("cannot stack states of different model versions")
            for k, v in s.tensors.items():
                ref = states[0].tensors[k]
                if v.shape[:1] + v.shape[2:] != ref.shape[:1] + ref.shape[2:]:
                    raise ValueError(
                        f"cannot stack states of different models: {k!r} is {tuple(v.shape)} here and "
                        f"{tuple(ref.shape)} in the first (layers, batch, ...)"
                    )
        return State(
            version, {k: torch.cat([s.tensors[k] for s in states], dim=1) for k in states[0].tensors}
        )

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same folder, then rename)."""
        payload = {"format": _FORMAT, "version": self.version}
        payload.update({k: v.detach().cpu() for k, v in self.tensors.items()})
        atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> State:
        """Read a file written by ``save``; ValueError (naming the problem) for anything else."""
        where = f"state file {str(path)!r}"
        payload = safe_torch_load(path, "state file", map_location="cpu")
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{str(path)!r} is not an rwkvkit state file")
        version = payload.get("version")
        from .models import registry

        if type(version) is not int or version not in registry.VERSIONS:
            raise ValueError(
                f"{where} has no valid 'version' (got {version!r}; expected one of {sorted(registry.VERSIONS)})"
            )
        keys = state_keys(version)
        missing = [k for k in keys if k not in payload]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        extra = [k for k in payload if k not in keys and k not in ("format", "version")]
        if extra:
            raise ValueError(f"{where} has unexpected entries {[str(k) for k in extra][:5]}")
        state = cls(version, {k: payload[k] for k in keys})
        state.validate(where)
        return state.to(device)

    def validate(self, where: str = "state") -> None:
        """Raise ValueError unless every part the version declares is a finite float tensor and the
        shapes agree with each other (same layers and batch rows; both shifts [L, B, C]). Whether the
        per-layer shapes fit a model is ``check``'s job."""
        try:
            keys = state_keys(self.version)
        except ValueError:
            raise ValueError(f"{where}: unknown RWKV version {self.version!r}") from None
        for k in keys:
            t = self.tensors.get(k)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{where}: {k!r} is {type(t).__name__}, not a tensor")
            if not t.is_floating_point():
                raise ValueError(f"{where}: {k!r} has dtype {t.dtype}, expected a floating-point tensor")
            if t.dim() < 3 or 0 in t.shape:
                raise ValueError(
                    f"{where}: {k!r} has shape {tuple(t.shape)}, expected [layers, rows, ...] non-empty"
                )
        L, B, C = self.tensors["att_shift"].shape
        for k in keys:
            t = self.tensors[k]
            if tuple(t.shape[:2]) != (L, B):
                raise ValueError(
                    f"{where}: {k!r} has {t.shape[0]} layers x {t.shape[1]} rows, 'att_shift' has {L} x {B}"
                )
        ffn = self.tensors["ffn_shift"]
        if ffn.dim() != 3 or ffn.shape[2] != C:
            raise ValueError(f"{where}: 'ffn_shift' has width {tuple(ffn.shape[2:])}, 'att_shift' has {C}")
        for k in keys:
            lo, hi = torch.aminmax(self.tensors[k].detach())
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                raise ValueError(f"{where}: {k!r} holds NaN or Inf values")

    def check(self, config: ModelConfig, batch_size: int | None = None) -> None:
        """Raise ValueError if this state does not fit ``config`` (and ``batch_size`` if given)."""
        if self.version != config.version:
            raise ValueError(f"state is for RWKV-{self.version}, model is RWKV-{config.version}")
        for k, (L, rest) in _layout(config).items():
            t = self.tensors.get(k)
            if t is None:
                raise ValueError(f"state lacks {k!r}")
            if t.dim() != 2 + len(rest) or t.shape[0] != L or tuple(t.shape[2:]) != rest:
                raise ValueError(
                    f"state {k!r} has shape {tuple(t.shape)}, model needs {(L, 1, *rest)} (B=any)"
                )
        if batch_size is not None and self.batch_size != batch_size:
            raise ValueError(f"state has batch size {self.batch_size}, input has {batch_size}")


@functools.lru_cache(maxsize=64)
def _layout(config: ModelConfig) -> dict[str, tuple[int, tuple[int, ...]]]:
    """Each state tensor's layers and the shape after the batch dimension, for ``State.check`` (once per
    config: it runs at every forward, a decode step's included)."""
    return {
        k: (v.shape[0], tuple(v.shape[2:])) for k, v in State.zeros(config, 1, device="meta").tensors.items()
    }


def _time_state_layout(version: int):
    from .models import registry

    spec = registry.get(version)
    if spec.time_state is None:
        raise ValueError(f"state tuning (time_state) does not exist for {spec.name}: it has no matrix state")
    return spec.time_state
