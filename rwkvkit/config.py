"""ModelConfig: every architecture choice of an RWKV model, how to read it from a checkpoint, and the
official checkpoint layout (every key and shape) it implies.

Released checkpoints carry no config: the version and sizes are read from key names and tensor
shapes. The generic part (vocabulary, width, layers, channel-mix width) is read here; which version a
file is, its head size and its own sizes (Finch's LoRA widths, ...) are each version's declarations
(``rwkvkit.models.spec.Version``, registered in ``rwkvkit.models.registry``). A layout no registered
version claims is refused with a message that says what was found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .models.spec import Version


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unreadable, unsupported version, missing or misshapen keys."""


def _registry():
    from .models import registry  # the versions import this module: resolved at call time

    return registry


@dataclass(frozen=True, init=False)
class ModelConfig:
    """``ModelConfig(version, n_layer, n_embd, vocab_size, head_size=64, ffn_dim=0, **sizes)``.

    ``sizes`` are the version's own (``Version.sizes``, e.g. Finch's ``mix_lora`` and ``decay_lora``),
    readable as attributes (``config.mix_lora``); missing ones take the version's defaults. Sizes that
    only another version declares are ignored (a flat training config passes Finch's LoRA widths for
    every version); unknown names are refused.
    """

    version: int  # a registered version: 4 (RWKV-4), 5 (Eagle, RWKV-5.2), 6 (Finch), 7 (Goose)
    n_layer: int  # number of blocks
    n_embd: int  # C, the residual width
    vocab_size: int  # V, 65536 for the World models
    head_size: int = 64  # N, per-head key/value size; a version without heads has head_size = n_embd
    ffn_dim: int = 0  # F, channel-mix hidden width; 0 means the version's default
    sizes: Mapping[str, int] = field(default_factory=dict, hash=False)  # the version's own sizes

    def __init__(
        self,
        version: int,
        n_layer: int,
        n_embd: int,
        vocab_size: int,
        head_size: int = 64,
        ffn_dim: int = 0,
        sizes: Mapping[str, int] | None = None,
        **more: int,
    ) -> None:
        spec = _registry().get(version)
        given = {**(sizes or {}), **more}
        unknown = sorted(set(given) - set(spec.sizes) - _registry().all_sizes())
        if unknown:
            raise TypeError(
                f"ModelConfig got unknown sizes {unknown}; RWKV-{version} takes {sorted(spec.sizes)}"
            )
        own = {name: int(given.get(name, spec.default_size(name, n_embd))) for name in spec.sizes}
        values = dict(version=version, n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size)
        for name, value in values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "head_size", head_size if spec.heads else n_embd)
        object.__setattr__(self, "sizes", own)
        for name in ("n_layer", "n_embd", "vocab_size", "head_size", *own):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")
        object.__setattr__(self, "ffn_dim", ffn_dim or spec.default_ffn_dim(n_embd))

    def __getattr__(self, name: str) -> Any:  # the version's own sizes: config.mix_lora
        sizes = self.__dict__.get("sizes")
        if sizes is not None and name in sizes:
            return sizes[name]
        raise AttributeError(f"{type(self).__name__} of RWKV-{self.__dict__.get('version')} has no {name!r}")

    @property
    def spec(self) -> Version:
        """The version's declarations (``rwkvkit.models.spec.Version``)."""
        return _registry().get(self.version)

    @property
    def n_head(self) -> int:
        return self.spec.n_head(self)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> ModelConfig:
        """Read the architecture from an official state dict's keys and shapes."""
        if "emb.weight" not in sd:
            raise CheckpointError(
                "not an RWKV checkpoint: key 'emb.weight' is missing "
                f"(found {len(sd)} keys, e.g. {sorted(sd)[:5]})"
            )
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        if not blocks:
            raise CheckpointError("not an RWKV checkpoint: no 'blocks.<i>.' keys found")
        n_layer = max(blocks) + 1
        missing_blocks = sorted(set(range(n_layer)) - blocks)
        if missing_blocks:
            raise CheckpointError(f"checkpoint has no keys for blocks {missing_blocks} (n_layer {n_layer})")
        emb = sd["emb.weight"]
        if emb.dim() != 2:
            raise CheckpointError(f"emb.weight must be 2-D [vocab, n_embd], got shape {tuple(emb.shape)}")
        vocab_size, n_embd = emb.shape
        spec = _registry().detect(sd)
        ffn_key = sd.get("blocks.0.ffn.key.weight")
        if ffn_key is None:
            raise CheckpointError("missing key 'blocks.0.ffn.key.weight'")
        sizes = spec.read_sizes(sd, n_embd)
        head_size = sizes.pop("head_size", n_embd)
        return cls(
            spec.version, n_layer, n_embd, vocab_size, head_size=head_size, ffn_dim=ffn_key.shape[0], **sizes
        )


def checkpoint_keys(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official checkpoint for ``config``, with its shape (the order of RWKV-LM's files)."""
    C, V = config.n_embd, config.vocab_size
    layer = config.spec.layer_keys(config)
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(config.n_layer):
        b = f"blocks.{i}."
        norms = ("ln0", "ln1", "ln2") if i == 0 else ("ln1", "ln2")
        for ln in norms:
            shapes[f"{b}{ln}.weight"] = (C,)
            shapes[f"{b}{ln}.bias"] = (C,)
        shapes.update({b + k: shape for k, shape in layer.items()})
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes
