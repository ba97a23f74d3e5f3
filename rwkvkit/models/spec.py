"""``Version``: what one RWKV version declares about itself, the only interface between a version's own
module (``rwkv4.py``, ``rwkv5.py``, ``rwkv6.py``, ``rwkv7.py``) and the rest of the package.

A version module defines its time-mix and channel-mix modules and one ``Version`` subclass whose
instance ``registry.py`` registers. Everything outside the version modules asks that instance instead
of testing the version number: ``ModelConfig`` (detection, sizes read from shapes, the default ffn
width, whether it has heads), ``checkpoint_keys`` (every key and shape of a block), ``checkpoint.load``
(which parameters are matrices in the model dtype), ``State`` (the recurrent tensors per layer, their
shapes and initial values, the ``time_state`` file convention), the model (which modules a block
holds and which state tensors its time-mix carries), the native step's plan (``engine.py``), RWKV-LM's
initialisation (``train/init.py``) and the optimiser's learning-rate multipliers (``train/optim.py``).

What a subclass must provide is marked "required"; the rest has defaults that fit a version without
the feature (no LoRA matrices, no ``time_state``, no native step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..config import ModelConfig


CHUNKED = "chunked parallel form (PyTorch); one token: the per-step loop"
Uniform = Callable[[tuple[int, ...], float, float], torch.Tensor]  # (shape, lo, hi) -> U(lo, hi) draws


class StateSlot(NamedTuple):
    """One fp32 recurrent tensor of the time-mix, per layer and batch row: ``shape(config)`` and the
    value a sequence starts from. (The two token-shift tensors, ``att_shift`` and ``ffn_shift`` [C]
    in the model's compute dtype, are common to every version and not declared.)"""

    name: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    fill: float = 0.0


class TimeStateLayout(NamedTuple):
    """How a state-tuned file's ``blocks.{i}.att.time_state`` maps onto a ``State``: the recurrent
    tensor it sets (``slot``) and whether the file stores its last two axes transposed."""

    slot: str
    transposed: bool


def per_channel(config: ModelConfig) -> tuple[int, ...]:
    """[C]: one number per channel (RWKV-4's aa, bb, pp)."""
    return (config.n_embd,)


def per_head_matrix(config: ModelConfig) -> tuple[int, ...]:
    """[H, N, N]: one matrix per head (Eagle, Finch, RWKV-7)."""
    return (config.n_head, config.head_size, config.head_size)


def rwkv_lm_ramps(
    config: ModelConfig, layer: int
) -> tuple[float, float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RWKV-LM's per-layer ramps: ``r01 = l/(L-1)``, ``r10 = 1 - l/L``, ``ddd = i/C`` [1, 1, C],
    ``frac = n/(C-1)`` [C] and the zigzag ``(n+1)%3 - 1`` [C], float64."""
    L, C = config.n_layer, config.n_embd
    r01 = layer / (L - 1) if L > 1 else 0.0
    n = torch.arange(C, dtype=torch.float64)
    return r01, 1.0 - layer / L, (n / C).view(1, 1, C), n / max(C - 1, 1), ((n + 1) % 3 - 1).double()


class Version:
    """The declarations of one RWKV version (subclass it in the version's module)."""

    # ---- identity and modules (required) --------------------------------------------------------
    version: int  # the number of ModelConfig.version, state files and messages ("RWKV-6")
    name: str  # for people: "Finch (RWKV-6)"
    short: str  # in lists: "Finch"
    time_mix: type[nn.Module]  # TimeMix(config): forward(x, shift, recurrent, backend, mixed=None,
    #                            carry=None) -> (out, new shift, new recurrent); shift_mix_spec(...)
    channel_mix: type[nn.Module]  # ChannelMix(config): forward(x, shift), shift_mix_spec, forward_mixed

    # ---- sizes ----------------------------------------------------------------------------------
    sizes: Mapping[str, int] = {}  # the version's own sizes with their defaults (read from shapes)
    heads: bool = True  # a matrix state per head of head_size; False: one "head" as wide as n_embd

    # ---- parameters -----------------------------------------------------------------------------
    matrix_params: tuple[str, ...] = ()  # parameter names (last part) kept in the model dtype besides
    #                                      Linear weights, embedding and head (e.g. Finch's LoRAs)
    lr_mult: Mapping[str, float] = {}  # parameter name (last part) -> learning-rate multiplier
    zero_init: tuple[str, ...] = ()  # matrices RWKV-LM starts at zero ("att.output", ...)
    small_init: tuple[str, ...] = ()  # matrices RWKV-LM starts orthogonal with gain 0.1
    init_gain_by_shape: bool = True  # RWKV-LM's orthogonal gain grows by sqrt(out/in) for tall matrices
    fold_ln0_in_model_dtype: bool = False  # the reference folds ln0 after converting (True) or in the
    #                                        checkpoint's dtype (False: bf16 files fold in bf16)

    # ---- state ----------------------------------------------------------------------------------
    recurrent: tuple[StateSlot, ...] = ()  # the time-mix's state, in the order it takes it (required)
    time_state: TimeStateLayout | None = None  # None: state-tuned files do not exist for the version

    # ---- required methods -----------------------------------------------------------------------
    def detect(self, sd: Mapping[str, torch.Tensor]) -> bool:
        """True when the state dict ``sd`` is this version's. Raise ``CheckpointError`` for a file of
        the version's family that is not supported (say which, and what is)."""
        raise NotImplementedError

    def read_sizes(self, sd: Mapping[str, torch.Tensor], n_embd: int) -> dict[str, int]:
        """``head_size`` and the version's ``sizes`` read from the shapes of ``sd`` (raise
        ``CheckpointError`` naming a key whose shape does not fit)."""
        raise NotImplementedError

    def layer_keys(self, config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """The ``att.*`` and ``ffn.*`` keys of one block with their shapes, in the order of RWKV-LM's files
        (the LayerNorms ln0/ln1/ln2 are common and not listed)."""
        raise NotImplementedError

    def init_values(self, config: ModelConfig, layer: int) -> dict[str, torch.Tensor]:
        """RWKV-LM's deterministic initial values of the block's own parameters (``att.time_decay``,
        mixes, ``att.ln_x.weight``, ...), keyed like ``layer_keys``, float64."""
        raise NotImplementedError

    # ---- optional methods -----------------------------------------------------------------------
    def time_mix_for(self, config: ModelConfig, layer: int) -> nn.Module:
        """The time-mix module of block ``layer`` (a version whose first layer differs overrides this)."""
        return self.time_mix(config)

    def default_ffn_dim(self, n_embd: int) -> int:
        """The channel-mix width when the config gives none."""
        return 4 * n_embd

    def default_size(self, name: str, n_embd: int) -> int:
        """The default of the version's own size ``name`` for width ``n_embd`` (``sizes[name]`` unless
        the version derives it from the width)."""
        return self.sizes[name]

    def init_random(self, name: str, shape: torch.Size, gen: torch.Generator | None) -> torch.Tensor | None:
        """RWKV-LM's random start of a non-matrix parameter ``name`` (its last part), or None."""
        return None

    def random_param(self, name: str, shape: tuple[int, ...], uniform: Uniform) -> torch.Tensor | None:
        """A random value, realistic in range, of the version's own non-matrix parameter ``name`` (its
        last part) for ``rwkvkit.testing.random_checkpoint``; draw with ``uniform(shape, lo, hi)`` only."""
        return None

    def native_header(self, config: ModelConfig) -> list[int]:
        """The version-specific tail of the native step's plan header (``_decode_cpu.c``'s ``plan_t``);
        raise ``NotImplementedError`` with the reason when the version has no native step."""
        raise NotImplementedError(f"{self.name} has no native one-token step")

    def native_layer(self, plan: Any, block: nn.Module) -> None:
        """Append one layer's record (``layer_t``) to ``plan`` (an ``engine.PlanBuilder``)."""
        raise NotImplementedError(f"{self.name} has no native one-token step")

    def wkv_kernel(self, model: nn.Module) -> tuple[str, str]:
        """(which WKV implementation ``backend="auto"`` runs for ``model``'s inference, why not a
        faster one or ''), for ``model.describe()``."""
        return CHUNKED, f"no native WKV kernel for {self.name}"

    # ---- derived --------------------------------------------------------------------------------
    def n_head(self, config: ModelConfig) -> int:
        return config.n_embd // config.head_size if self.heads else 1

    def state_names(self) -> tuple[str, ...]:
        """Every tensor of a ``State`` of this version, in file order."""
        return ("att_shift", *(s.name for s in self.recurrent), "ffn_shift")

    def is_matrix(self, key: str) -> bool:
        """Whether a checkpoint key is stored in the model's dtype (Linear weights, embedding, head,
        ``matrix_params``); everything else (LayerNorms, mixes, decays, bonuses) is fp32."""
        last = key.split(".")
        if last[-1] in self.matrix_params:
            return True
        return last[-1] == "weight" and len(last) >= 2 and not last[-2].startswith(("ln", "time"))

    def __repr__(self) -> str:
        return f"<{self.name}>"
