"""ModelConfig: every architecture choice of an RWKV model, how to read it from a checkpoint, and the
official checkpoint layout (every key and shape) it implies.

Released checkpoints carry no config: the version and sizes are read from key names and tensor
shapes, following the rules of the reference implementation (see ../shared/REFERENCE.md):
``ln_x`` present means 5.x, ``gate.weight`` means >= 5.1, a 2-D ``time_decay`` with ``shape[1] > 1``
means 5.2, ``time_maa_*`` means 6. Only 4, 5.2 and 6 are supported; anything else is refused with a
message that says what was found.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unreadable, unsupported version, missing or misshapen keys."""


@dataclass(frozen=True)
class ModelConfig:
    version: int  # 4 (RWKV-4), 5 (Eagle, RWKV-5.2) or 6 (Finch, RWKV-6)
    n_layer: int  # number of blocks
    n_embd: int  # C, the residual width
    vocab_size: int  # V, 65536 for the World models
    head_size: int = 64  # N, per-head key/value size (v5/v6); v4 has no heads (head_size = n_embd)
    ffn_dim: int = 0  # F, channel-mix hidden width; 0 means the version's default
    mix_lora: int = 32  # Finch: width D of the token-shift LoRA (time_maa_w1 is [C, 5D])
    decay_lora: int = 64  # Finch: width Dw of the decay LoRA (time_decay_w1 is [C, Dw])

    def __post_init__(self) -> None:
        if self.version not in (4, 5, 6):
            raise ValueError(f"unsupported RWKV version {self.version!r}: rwkvkit supports 4, 5 (5.2) and 6")
        for name in ("n_layer", "n_embd", "vocab_size", "head_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")
        if self.version in (5, 6) and self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")
        if self.ffn_dim == 0:
            object.__setattr__(self, "ffn_dim", self.default_ffn_dim(self.version, self.n_embd))

    @staticmethod
    def default_ffn_dim(version: int, n_embd: int) -> int:
        """RWKV-4 uses 4C; Eagle and Finch use int(3.5C) rounded down to a multiple of 32."""
        return 4 * n_embd if version == 4 else int(n_embd * 3.5) // 32 * 32

    @property
    def n_head(self) -> int:
        return 1 if self.version == 4 else self.n_embd // self.head_size

    def to_dict(self) -> dict:
        return asdict(self)

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
        att = "blocks.0.att."
        version = _detect_version(sd, att)
        ffn_key = sd.get("blocks.0.ffn.key.weight")
        if ffn_key is None:
            raise CheckpointError("missing key 'blocks.0.ffn.key.weight'")
        ffn_dim = ffn_key.shape[0]
        if version == 4:
            return cls(4, n_layer, n_embd, vocab_size, head_size=n_embd, ffn_dim=ffn_dim)
        faaaa = sd.get(att + "time_faaaa")
        if faaaa is None or faaaa.dim() != 2:
            raise CheckpointError(f"missing or misshapen '{att}time_faaaa' (expected [n_head, head_size])")
        n_head, head_size = faaaa.shape
        if n_head * head_size != n_embd:
            raise CheckpointError(
                f"time_faaaa shape {tuple(faaaa.shape)} does not match n_embd {n_embd} (n_head * head_size)"
            )
        if version == 5:
            return cls(5, n_layer, n_embd, vocab_size, head_size=head_size, ffn_dim=ffn_dim)
        w1 = sd.get(att + "time_maa_w1")
        dw1 = sd.get(att + "time_decay_w1")
        if w1 is None or dw1 is None:
            raise CheckpointError("RWKV-6 checkpoint without time_maa_w1 / time_decay_w1")
        if w1.dim() != 2 or w1.shape[1] % 5:
            raise CheckpointError(f"time_maa_w1 must be [n_embd, 5*D], got {tuple(w1.shape)}")
        return cls(
            6,
            n_layer,
            n_embd,
            vocab_size,
            head_size=head_size,
            ffn_dim=ffn_dim,
            mix_lora=w1.shape[1] // 5,
            decay_lora=dw1.shape[1],
        )


def _detect_version(sd: Mapping[str, torch.Tensor], att: str) -> int:
    has = lambda name: (att + name) in sd
    if has("time_maa_x") or has("time_maa_w1"):
        return 6
    if any(k.startswith("blocks.0.att.") and k.endswith(("k_k", "k_a", "w0", "a0", "v0")) for k in sd):
        raise CheckpointError("this looks like an RWKV-7 (Goose) checkpoint; rwkvkit supports 4, 5.2 and 6")
    if has("ln_x.weight"):
        if not has("gate.weight"):
            raise CheckpointError(
                "this is an RWKV-5.0 checkpoint (ln_x without gate); rwkvkit supports 4, 5.2 and 6"
            )
        td = sd.get(att + "time_decay")
        if td is not None and td.dim() == 2 and td.shape[1] > 1:
            return 5
        raise CheckpointError(
            "this is an RWKV-5.1 checkpoint (time_decay of shape "
            f"{None if td is None else tuple(td.shape)}); rwkvkit supports 4, 5.2 and 6"
        )
    if has("time_first") and has("time_mix_k"):
        return 4
    found = sorted(k[len(att) :] for k in sd if k.startswith(att))
    raise CheckpointError(f"unknown RWKV layout: block 0 time-mix keys are {found}")


def checkpoint_keys(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key of an official checkpoint for ``config``, with its shape (the order of RWKV-LM's files)."""
    C, V, L, F = config.n_embd, config.vocab_size, config.n_layer, config.ffn_dim
    H, N = config.n_head, config.head_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}
    for i in range(L):
        b = f"blocks.{i}."
        if i == 0:
            shapes[b + "ln0.weight"] = (C,)
            shapes[b + "ln0.bias"] = (C,)
        for ln in ("ln1", "ln2"):
            shapes[f"{b}{ln}.weight"] = (C,)
            shapes[f"{b}{ln}.bias"] = (C,)
        a = b + "att."
        if config.version == 4:
            for m in "kvr":
                shapes[a + f"time_mix_{m}"] = (1, 1, C)
            shapes[a + "time_decay"] = (C,)
            shapes[a + "time_first"] = (C,)
        elif config.version == 5:
            for m in "kvrg":
                shapes[a + f"time_mix_{m}"] = (1, 1, C)
            shapes[a + "time_decay"] = (H, N)
            shapes[a + "time_faaaa"] = (H, N)
        else:
            D, Dw = config.mix_lora, config.decay_lora
            for m in "xwkvrg":
                shapes[a + f"time_maa_{m}"] = (1, 1, C)
            shapes[a + "time_maa_w1"] = (C, 5 * D)
            shapes[a + "time_maa_w2"] = (5, D, C)
            shapes[a + "time_decay"] = (1, 1, C)
            shapes[a + "time_decay_w1"] = (C, Dw)
            shapes[a + "time_decay_w2"] = (Dw, C)
            shapes[a + "time_faaaa"] = (H, N)
        for m in ("receptance", "key", "value"):
            shapes[a + f"{m}.weight"] = (C, C)
        shapes[a + "output.weight"] = (C, C)
        if config.version >= 5:
            shapes[a + "gate.weight"] = (C, C)
            shapes[a + "ln_x.weight"] = (C,)
            shapes[a + "ln_x.bias"] = (C,)
        f = b + "ffn."
        mix = "time_maa" if config.version == 6 else "time_mix"
        shapes[f + f"{mix}_k"] = (1, 1, C)
        shapes[f + f"{mix}_r"] = (1, 1, C)
        shapes[f + "key.weight"] = (F, C)
        shapes[f + "receptance.weight"] = (C, C)
        shapes[f + "value.weight"] = (C, F)
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes
