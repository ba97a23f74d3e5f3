"""What every command that runs a model shares: its options, loading, and finding its vocabulary.

``add_model_args`` gives a parser ``--model``, ``--vocab``, ``--device``, ``--dtype`` (fp32 | bf16 |
fp16) and ``--quantize int8``; ``load_model_and_tokenizer`` turns them into a model and its tokenizer.
``generate``, ``chat`` and ``serve`` use it, and so should any new command that runs a model.

The vocabulary of a model (``find_vocab``), one rule:

1. ``--vocab FILE`` when given;
2. else ``<model stem>.vocab.txt`` beside the model file (``demo-finch-L6-C256.pth`` ->
   ``demo-finch-L6-C256.vocab.txt``: how the shipped demo model carries its own);
3. else ``vocab.txt`` in the model's folder (what ``rwkvkit train`` copies into its ``out_dir``, so
   every ``rwkv-<step>.pth`` it writes is usable at once);
4. else the World vocabulary, but only for a model whose vocabulary size is 65536 (the World
   vocabulary's padded size); any other size is an error that says to pass ``--vocab``.

A vocabulary with more ids than the model's embedding has rows is refused: its ids could not be fed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .dtypes import DTYPES, dtype_from_name

WORLD_VOCAB_SIZE = 65536  # the World vocabulary (ids 0..65529) as released models pad it


def add_model_args(
    p: argparse.ArgumentParser, *, dtype: str = "fp32", default_model: str | None = None
) -> None:
    """``--model``, ``--vocab``, ``--device``, ``--dtype``, ``--quantize`` (``--model`` is required
    unless ``default_model`` is given)."""
    where = "local .pth/.safetensors, hf://owner/repo/file.pth or owner/repo:file"
    if default_model is None:
        p.add_argument("--model", required=True, help=where)
    else:
        p.add_argument("--model", default=default_model, help=f"{where} (default: %(default)s)")
    p.add_argument(
        "--vocab",
        default=None,
        help="vocabulary file (default: <model stem>.vocab.txt or vocab.txt beside the model, "
        "else the World vocabulary for models of 65536 tokens)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default=dtype, choices=sorted(DTYPES), help="weights' dtype (default %(default)s)"
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=["int8"],
        help="int8: store the matrices as int8 (Q8_0, fast CPU decode); --dtype applies to the rest",
    )


def find_vocab(model_path: str | Path, vocab_size: int, vocab: str | Path | None = None) -> Path | None:
    """The vocabulary file for a model of ``vocab_size`` tokens at ``model_path`` (None: the World
    vocabulary). Raises ValueError when there is none, naming the places it looked."""
    if vocab is not None:
        p = Path(vocab)
        if not p.is_file():
            raise ValueError(f"vocabulary file {str(p)!r} does not exist")
        return p
    model_path = Path(model_path)
    beside = [model_path.with_name(model_path.stem + ".vocab.txt"), model_path.with_name("vocab.txt")]
    for p in beside:
        if p.is_file():
            return p
    if vocab_size == WORLD_VOCAB_SIZE:
        return None
    looked = " or ".join(repr(str(p)) for p in beside)
    raise ValueError(
        f"the model has a vocabulary of {vocab_size} tokens, not the World vocabulary's {WORLD_VOCAB_SIZE}, "
        f"and no vocabulary file was found beside it (looked for {looked}): pass --vocab FILE"
    )


def load_tokenizer(model_path: str | Path, vocab_size: int, vocab: str | Path | None = None) -> Any:
    """The tokenizer ``find_vocab`` chooses, checked against the model's ``vocab_size``."""
    from .tokenizer import Tokenizer

    path = find_vocab(model_path, vocab_size, vocab)
    tok = Tokenizer(path)
    if tok.vocab_size > vocab_size:
        where = f"vocabulary {str(path)!r}" if path is not None else "the World vocabulary"
        raise ValueError(
            f"{where} has {tok.vocab_size} ids but the model only {vocab_size}: it is not this model's "
            "vocabulary (pass the right one with --vocab)"
        )
    return tok


def check_device(device: str) -> torch.device:
    """``device`` as a torch device, or a ValueError naming why it cannot run a model here (an unknown
    name, a CUDA device on a build or machine without CUDA, an index past the GPUs there are)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {device!r} is not a device name (cpu, cuda, cuda:1, ...): {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            )
            raise ValueError(f"--device {device!r}: {build}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: there are {torch.cuda.device_count()} CUDA devices")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device!r}: only cpu and cuda devices are supported")
    return dev


def load_model(
    ref: str, device: str = "cpu", dtype: str = "fp32", quantize: str | None = None
) -> tuple[torch.nn.Module, Path]:
    """Resolve ``ref`` (local file or Hugging Face file) and load it for inference; (model, local path)."""
    from .checkpoint import load
    from .hub import resolve_model

    torch_dtype = dtype_from_name(dtype)
    check_device(device)
    path = resolve_model(ref)
    return load(path, device=device, dtype=torch_dtype, quantize=quantize), Path(path)


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, Path]:
    """(model, tokenizer, model path) from ``add_model_args``' options. Raises ``ModelNotFound`` or
    ValueError (``CheckpointError``, ``VocabError``, a missing vocabulary) with a one-line message."""
    model, path = load_model(args.model, args.device, args.dtype, args.quantize)
    try:
        tok = load_tokenizer(path, int(model.config.vocab_size), args.vocab)
    except FileNotFoundError as e:  # an unreadable vocabulary file
        raise ValueError(str(e)) from None
    return model, tok, path
