"""RWKV model modules: shared pieces, one time-mix module per version, and the language model."""

from .model import RWKV, Block

__all__ = ["RWKV", "Block"]
