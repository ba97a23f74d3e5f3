"""What ``rwkvkit eval`` and ``rwkvkit eval perplexity`` add to the shared model options
(``rwkvkit.model_args``): ``--model`` defaults to the small Finch shipped in the repository, so both
commands run out of the box, and ``--threads``. The vocabulary follows ``model_args``' one rule.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from .. import model_args
from ..cli_args import non_negative_int

DEMO_MODEL = Path(__file__).resolve().parent.parent / "assets" / "demo-finch-L6-C256.pth"


def add_model_args(p: argparse.ArgumentParser) -> None:
    model_args.add_model_args(p, default_model=str(DEMO_MODEL))
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: leave as is)")


def load_model(ref: str, device: str = "cpu", dtype: str = "fp32", quantize: str | None = None) -> Any:
    """Resolve ``ref`` (local file or Hugging Face file) and load it for inference."""
    return model_args.load_model(ref, device, dtype, quantize)[0]


def load_tokenizer(model: Any, model_ref: str, vocab: str | None) -> Any:
    """The tokenizer for ``model`` by ``model_args``' rule (``vocab`` if given, else beside the model)."""
    from ..hub import resolve_model

    return model_args.load_tokenizer(resolve_model(model_ref), int(model.config.vocab_size), vocab)


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, tokenizer) from the options of ``add_model_args``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, _ = model_args.load_model_and_tokenizer(args)
    return model, tok
