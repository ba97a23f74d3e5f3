"""What ``rwkvkit eval`` and ``rwkvkit eval perplexity`` share: the model options, loading the model
and choosing its tokenizer.

``--model`` defaults to the small Finch shipped in the repository (with its own vocabulary), so both
commands run out of the box. The vocabulary is the World one unless ``--vocab`` names another file;
``resolve_vocab`` is the one place that decides.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo-finch-L6-C256.pth"
DEMO_VOCAB = DEMO_MODEL.with_name("demo-vocab.txt")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=str(DEMO_MODEL),
        help="local .pth/.safetensors, hf://owner/repo/file.pth or owner/repo:file (default: the demo model)",
    )
    p.add_argument(
        "--vocab", default=None, help="the model's vocabulary file (default: World, or the demo's)"
    )
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="matrix dtype (default fp32)")
    p.add_argument("--quantize", default=None, choices=["int8"], help="int8 matrices (Q8_0 layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")


def resolve_vocab(model_ref: str, vocab: str | None) -> str | None:
    """The vocabulary file for ``model_ref``: ``vocab`` if given, the demo's own for the demo model,
    else None (the World vocabulary shipped with rwkvkit)."""
    if vocab:
        return vocab
    try:
        if Path(model_ref).resolve() == DEMO_MODEL:
            return str(DEMO_VOCAB)
    except OSError:
        pass
    return None


def load_model(ref: str, device: str = "cpu", dtype: str = "fp32", quantize: str | None = None) -> Any:
    """Resolve ``ref`` (local file or Hugging Face file) and load it for inference."""
    from ..checkpoint import load
    from ..hub import resolve_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return load(resolve_model(ref), device=device, dtype=DTYPES[dtype], quantize=quantize)


def load_tokenizer(model: Any, model_ref: str, vocab: str | None) -> Any:
    """The tokenizer for ``model``, checked to fit its vocabulary."""
    from ..tokenizer import Tokenizer

    path = resolve_vocab(model_ref, vocab)
    tok = Tokenizer(path)
    V = model.config.vocab_size
    if tok.vocab_size > V:
        where = f"{path!r}" if path else "the World vocabulary"
        raise ValueError(
            f"{where} has {tok.vocab_size} tokens but the model only {V}: pass the model's own "
            "vocabulary with --vocab"
        )
    return tok


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) from the options of ``add_model_args``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.device, args.dtype, args.quantize)
    return model, load_tokenizer(model, args.model, args.vocab)
