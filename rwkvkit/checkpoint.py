"""Official checkpoints in and out: ``.pth`` state dicts (as BlinkDL publishes them) and ``.safetensors``.

``load`` reads the file safely (``torch.load(weights_only=True, mmap=True)``: a pickle that would run
code is refused, and a 7B file is mapped, not copied), reads the architecture from keys and shapes,
checks every key and shape against what that architecture needs, refuses NaN/Inf weights (in the
file, or made by converting to fp16), and builds the model directly on the loaded tensors. By
default it folds ``blocks.0.ln0`` into the embedding in the dtype the reference does (v4-v6: the
checkpoint's; v7: the one it loads in, as its x070 class converts first), so bf16 files give the
reference's logits.
``save`` writes the official layout atomically (temporary name, then rename).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import CheckpointError, ModelConfig, checkpoint_keys
from .dtypes import DTYPES
from .dtypes import NAMES as _DTYPE_NAMES
from .io import atomic_torch_save, atomic_write, safe_torch_load
from .kernels import MALLOC_TUNE, Kernels
from .models.model import RWKV
from .models.quant import Int8Linear, quantize_int8
from .runtime import tune_malloc as _tune_malloc

FP16_RESCALE_EVERY = 6  # the reference's RESCALE_LAYER for fp16


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The raw tensors of a checkpoint file (.pth or .safetensors), without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "reading .safetensors needs the safetensors package: pip install rwkvkit[hub]"
            ) from e
        try:
            sd = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {e}") from e
    else:
        try:
            sd = safe_torch_load(path, "checkpoint", map_location="cpu", mmap=zipfile.is_zipfile(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors")
    bad_keys = [k for k in sd if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{str(path)!r} has non-string keys {bad_keys[:5]}: not an RWKV state dict")
    if any(k.startswith("module.") for k in sd):  # DDP / DeepSpeed wrappers
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def check_state_dict(sd: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    """Raise CheckpointError naming every missing, unexpected or misshapen key."""
    expected = checkpoint_keys(config)
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing keys for RWKV-{config.version}: {missing[:5]}{more}")
    extra = [k for k in sd if k not in expected and not k.endswith(".att.time_state")]
    if extra:
        raise CheckpointError(
            f"checkpoint has unexpected keys for RWKV-{config.version}: {sorted(extra)[:5]}"
        )
    for k, shape in expected.items():
        t = sd[k]
        if tuple(t.shape) != shape and [d for d in t.shape if d != 1] != [d for d in shape if d != 1]:
            raise CheckpointError(f"key {k!r} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise CheckpointError(f"key {k!r} has dtype {t.dtype}, expected a floating-point tensor")
    if not any(k.endswith(".att.time_state") for k in sd):
        return
    layout = config.spec.time_state
    if layout is None:
        raise CheckpointError(
            f"time_state keys in a {config.spec.name} checkpoint: it has no matrix state to tune"
        )
    slot = next(s for s in config.spec.recurrent if s.name == layout.slot)
    shape = slot.shape(config)
    for i in range(config.n_layer):
        ts = sd.get(f"blocks.{i}.att.time_state")
        if ts is not None and tuple(ts.shape) != shape:
            raise CheckpointError(
                f"key 'blocks.{i}.att.time_state' has shape {tuple(ts.shape)}, expected {shape}"
            )


def _check_finite(key: str, original: torch.Tensor, loaded: torch.Tensor, path: str | os.PathLike) -> None:
    """CheckpointError if ``loaded`` holds NaN or Inf: a model with them generates nothing or one token."""
    lo, hi = torch.aminmax(loaded)  # NaN propagates; ~50x faster than isfinite().all() on the CPU
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return
    bad = int((~torch.isfinite(loaded)).sum())
    if bool(torch.isfinite(original.float()).all()):  # finite in the file: the dtype conversion overflowed
        raise CheckpointError(
            f"{str(path)!r}: key {key!r} overflows to Inf in {_DTYPE_NAMES[loaded.dtype]} ({bad} of "
            f"{loaded.numel()} values, max |w| = {float(original.float().abs().max()):.4g}); load it in bf16 or fp32"
        )
    raise CheckpointError(
        f"{str(path)!r}: key {key!r} holds {bad} NaN/Inf values of {loaded.numel()}: the file is "
        "corrupt or comes from a diverged training run"
    )


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    quantize: str | None = None,
    *,
    fold_ln0: bool = True,
    kernels: Kernels | None = None,
    tune_malloc: bool | None = None,
) -> RWKV:
    """Load an official checkpoint of any registered version (RWKV-4, Eagle, Finch, Goose).

    ``dtype`` (fp32, bf16 or fp16: a torch dtype or its name) applies to the large matrices; LayerNorms, decays and the WKV state
    stay fp32. fp16 uses the reference's rescaling (``att.output``/``ffn.value`` halved every 6 layers,
    x halved after every 6th block) so it does not overflow. ``quantize="int8"`` stores the matrices as
    int8 (ggml's Q8_0 layout: an fp16 scale per 32 inputs) for fast CPU decode; ``dtype`` then applies to
    the embedding and the LoRAs. ``fold_ln0=True`` (default) folds ln0 into the embedding like the
    reference (v4-v6 in the checkpoint's dtype, v7 in ``dtype``) and returns a frozen inference
    model; ``fold_ln0=False`` keeps every parameter
    as in the file and trainable, for fine-tuning and re-saving.

    ``kernels``: the fast CPU paths the model may take (``rwkvkit.kernels.Kernels``; default: all, as
    the environment overrides leave them; ``model.set_kernels`` changes it later, ``model.describe()``
    shows what runs). ``tune_malloc``: for a CPU model, raise glibc's malloc thresholds for the process
    (``rwkvkit.runtime.tune_malloc``); None means yes unless ``RWKVKIT_MALLOC_TUNE=0``.
    """
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be fp32, bf16 or fp16 (or their torch dtypes), got {dtype!r}")
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    sd = read_state_dict(path)
    config = ModelConfig.from_state_dict(sd)
    check_state_dict(sd, config)
    expected = checkpoint_keys(config)
    rescale = FP16_RESCALE_EVERY if dtype == torch.float16 else 0

    tensors: dict[str, torch.Tensor] = {}
    for k, shape in expected.items():
        t = sd[k].reshape(shape)
        if fold_ln0 and k == "emb.weight":  # in the dtype the reference folds in (the version says)
            w0, b0 = sd["blocks.0.ln0.weight"], sd["blocks.0.ln0.bias"]
            if config.spec.fold_ln0_in_model_dtype:
                t = t.to(dtype)
            try:
                t = F.layer_norm(t, (config.n_embd,), weight=w0.to(t.dtype), bias=b0.to(t.dtype))
            except RuntimeError:
                t = F.layer_norm(t.float(), (config.n_embd,), weight=w0.float(), bias=b0.float())
        if rescale and k.endswith(("att.output.weight", "ffn.value.weight")):
            t = t.float() / 2 ** (int(k.split(".")[1]) // rescale)
        tensors[k] = t.to(dtype if config.spec.is_matrix(k) else torch.float32)
        _check_finite(k, sd[k], tensors[k], path)

    with torch.device("meta"):
        model = RWKV(config)
    model.load_state_dict(tensors, assign=True, strict=True)
    model.ln0_folded = fold_ln0
    model.rescale_every = rescale
    if any(k.endswith("att.time_state") for k in sd):
        missing = [i for i in range(config.n_layer) if f"blocks.{i}.att.time_state" not in sd]
        if missing:
            raise CheckpointError(f"time_state present for some layers but missing for layers {missing}")
        layers = []
        for i in range(config.n_layer):
            k = f"blocks.{i}.att.time_state"
            _check_finite(k, sd[k], sd[k].float(), path)
            layers.append(sd[k].float())
        if config.spec.time_state.transposed:  # file layout -> State layout
            layers = [t.transpose(-1, -2) for t in layers]
        model.time_state = torch.stack(layers)
    if quantize == "int8":
        quantize_int8(model)
    model = model.to(device)
    model.set_kernels(kernels or Kernels.default())
    if torch.device(device).type == "cpu" and (MALLOC_TUNE if tune_malloc is None else tune_malloc):
        _tune_malloc()  # reuse freed activation memory instead of page-faulting it in again
    if model.time_state is not None:
        model.time_state = model.time_state.to(device)
    model.eval()
    model.requires_grad_(not fold_ln0)
    return model


def _official_state_dict(model: RWKV) -> dict[str, torch.Tensor]:
    """``model``'s tensors under the official keys, as ``load`` read them (see ``save``)."""
    if model.ln0_folded:
        raise ValueError(
            "this model was loaded with ln0 folded into the embedding (inference mode); "
            "load it with rwkvkit.load(path, fold_ln0=False) to fine-tune or re-save it"
        )
    sd = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):  # its weight property dequantises: the values it multiplies by
            del sd[f"{name}.weight_int8"], sd[f"{name}.scale"]
            sd[f"{name}.weight"] = module.weight
    rescale = getattr(model, "rescale_every", 0)
    if rescale:  # load halved these every ``rescale`` layers (fp16): the file holds them whole
        for k in [k for k in sd if k.endswith(("att.output.weight", "ffn.value.weight"))]:
            sd[k] = sd[k].float() * 2 ** (int(k.split(".")[1]) // rescale)
    if model.time_state is not None:
        layers = model.time_state.float().cpu()
        if model.config.spec.time_state.transposed:  # State layout -> file layout
            layers = layers.transpose(-1, -2)
        sd.update({f"blocks.{i}.att.time_state": t.contiguous() for i, t in enumerate(layers)})
    return sd


def save(
    model_or_state_dict: RWKV | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    dtype: torch.dtype | None = torch.bfloat16,
) -> None:
    """Write an official-layout checkpoint (.pth, or .safetensors by suffix) atomically.

    ``dtype`` converts every floating tensor (bf16 by default, as released files); None keeps them.
    A model is written as the file it came from would be: an fp16 model's layer rescaling undone, int8
    matrices as their dequantised values (what the int8 model multiplies by), and a loaded
    ``time_state`` as its ``blocks.{i}.att.time_state`` keys.
    """
    if isinstance(model_or_state_dict, RWKV):
        sd = _official_state_dict(model_or_state_dict)
    else:
        sd = dict(model_or_state_dict)
    out = {}
    for k, v in sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(out, tmp))
    else:
        atomic_torch_save(out, path)
