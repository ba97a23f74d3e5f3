"""The recurrent state of an RWKV model as an explicit value.

A ``State`` holds, for every layer and batch row, what the model needs to continue a sequence:

- ``att_shift`` [L, B, C]: the previous token's normalised input to the time-mix (token shift)
- ``ffn_shift`` [L, B, C]: the previous token's normalised input to the channel-mix
- v5/v6: ``wkv`` [L, B, H, N, N] fp32, the matrix-valued state per head, laid out [key, value]
- v4: ``aa``, ``bb``, ``pp`` [L, B, C] fp32, numerator, denominator and running max exponent

Passing a state back to the model continues the sequence exactly. States can be cloned, moved,
saved to and loaded from a file (read without unpickling code and validated in full: version,
tensor types, consistent shapes, finite values), and split or stacked by batch row (for batched generation and for
caching the state of a shared prompt prefix). The WKV parts are always fp32; shifts follow the
model's compute dtype.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .io import atomic_torch_save, safe_torch_load

_KEYS = {4: ("att_shift", "aa", "bb", "pp", "ffn_shift"), 5: ("att_shift", "wkv", "ffn_shift")}
_KEYS[6] = _KEYS[5]
_FORMAT = "rwkvkit-state-1"


def state_keys(version: int) -> tuple[str, ...]:
    return _KEYS[version]


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
        """The state at the start of a sequence (``pp`` = -1e30 for v4, everything else zero)."""
        L, B, C = config.n_layer, batch_size, config.n_embd
        f32 = dict(device=device, dtype=torch.float32)
        t = {
            "att_shift": torch.zeros(L, B, C, device=device, dtype=dtype),
            "ffn_shift": torch.zeros(L, B, C, device=device, dtype=dtype),
        }
        if config.version == 4:
            t["aa"] = torch.zeros(L, B, C, **f32)
            t["bb"] = torch.zeros(L, B, C, **f32)
            t["pp"] = torch.full((L, B, C), -1e30, **f32)
        else:
            H, N = config.n_head, config.head_size
            t["wkv"] = torch.zeros(L, B, H, N, N, **f32)
        return cls(config.version, t)

    @classmethod
    def from_time_state(cls, sd: dict[str, torch.Tensor], config: ModelConfig) -> State:
        """A state-tuned file's ``blocks.{i}.att.time_state`` keys ([H, N, N], stored [value, key], as
        RWKV-LM writes them) as a batch-1 State: the WKV part set, the token-shift parts zero."""
        if config.version == 4:
            raise ValueError("state tuning (time_state) exists only for RWKV-5/6 models")
        st = cls.zeros(config, 1)
        H, N = config.n_head, config.head_size
        for i in range(config.n_layer):
            key = f"blocks.{i}.att.time_state"
            if key not in sd:
                raise ValueError(
                    f"state file lacks {key!r} (needs one time_state per layer, {config.n_layer} layers)"
                )
            t = sd[key]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{key!r} is not a floating-point tensor")
            if tuple(t.shape) != (H, N, N):
                raise ValueError(f"{key!r} has shape {tuple(t.shape)}, the model needs {(H, N, N)}")
            st.tensors["wkv"][i, 0] = t.float().transpose(-1, -2)
        st.validate("time_state")
        return st

    def to_time_state(self) -> dict[str, torch.Tensor]:
        """The inverse of ``from_time_state`` for batch row 0 (what state tuning exports)."""
        if self.version == 4:
            raise ValueError("time_state exists only for RWKV-5/6 states")
        wkv = self.tensors["wkv"][:, 0]
        return {f"blocks.{i}.att.time_state": wkv[i].transpose(-1, -2).contiguous() for i in range(len(wkv))}

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

    copy = clone

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
        """The state of some batch rows (an int keeps a batch dimension of 1)."""
        if isinstance(rows, int):
            rows = [rows]
        if isinstance(rows, slice):
            return State(self.version, {k: v[:, rows] for k, v in self.tensors.items()})
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
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
        return State(
            version, {k: torch.cat([s.tensors[k] for s in states], dim=1) for k in states[0].tensors}
        )

    cat = stack

    def assign_rows(self, rows: Sequence[int] | torch.Tensor, other: State) -> None:
        """In place: overwrite batch rows ``rows`` with the rows of ``other`` (same order)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        for k, v in self.tensors.items():
            v.index_copy_(1, idx, other.tensors[k].to(v.dtype))

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
        if type(version) is not int or version not in _KEYS:
            raise ValueError(
                f"{where} has no valid 'version' (got {version!r}; expected one of {sorted(_KEYS)})"
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
        """Raise ValueError unless every part is a finite float tensor and the shapes agree with each
        other (same layers and batch rows; v5/v6 ``wkv`` [L, B, H, N, N] with H * N = C)."""
        keys = _KEYS.get(self.version)
        if keys is None:
            raise ValueError(f"{where}: unknown RWKV version {self.version!r}")
        for k in keys:
            t = self.tensors.get(k)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{where}: {k!r} is {type(t).__name__}, not a tensor")
            if not t.is_floating_point():
                raise ValueError(f"{where}: {k!r} has dtype {t.dtype}, expected a floating-point tensor")
            want = 5 if k == "wkv" else 3
            if t.dim() != want or 0 in t.shape:
                raise ValueError(
                    f"{where}: {k!r} has shape {tuple(t.shape)}, expected {want} non-empty dimensions"
                )
        L, B, C = self.tensors["att_shift"].shape
        for k in keys:
            t = self.tensors[k]
            if tuple(t.shape[:2]) != (L, B):
                raise ValueError(
                    f"{where}: {k!r} has {t.shape[0]} layers x {t.shape[1]} rows, 'att_shift' has {L} x {B}"
                )
            if k != "wkv" and t.shape[2] != C:
                raise ValueError(f"{where}: {k!r} has width {t.shape[2]}, 'att_shift' has {C}")
        if "wkv" in self.tensors:
            H, N, N2 = self.tensors["wkv"].shape[2:]
            if N != N2 or H * N != C:
                raise ValueError(
                    f"{where}: 'wkv' heads {(H, N, N2)} do not fit width {C} (need H x N x N, H*N = C)"
                )
        for k in keys:
            lo, hi = torch.aminmax(self.tensors[k].detach())
            if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
                raise ValueError(f"{where}: {k!r} holds NaN or Inf values")

    def check(self, config: ModelConfig, batch_size: int | None = None) -> None:
        """Raise ValueError if this state does not fit ``config`` (and ``batch_size`` if given)."""
        if self.version != config.version:
            raise ValueError(f"state is for RWKV-{self.version}, model is RWKV-{config.version}")
        ref = State.zeros(config, 1, device="meta")
        for k, v in ref.tensors.items():
            t = self.tensors.get(k)
            if t is None:
                raise ValueError(f"state lacks {k!r}")
            if t.dim() != v.dim() or t.shape[0] != v.shape[0] or t.shape[2:] != v.shape[2:]:
                raise ValueError(
                    f"state {k!r} has shape {tuple(t.shape)}, model needs {tuple(v.shape)} (B=any)"
                )
        if batch_size is not None and self.batch_size != batch_size:
            raise ValueError(f"state has batch size {self.batch_size}, input has {batch_size}")
