"""``rwkvkit demo`` (``make demo``): generate text with the small Finch shipped in the repository.

The model in ``rwkvkit/assets/`` was trained from scratch by rwkvkit's own trainer on this kind of
machine (CPU only, 38 minutes in two phases, 1.54M tokens): Finch (RWKV-6) L6 C256 with an
8192-token subset of the World vocabulary, on Python's standard library sources, Jane Austen's
novels and the World English Bible.
``scripts/train_demo.sh`` is the exact command that produced it; ``demo-metrics.jsonl`` and
``demo-loss.png`` next to it are its training log. It is small and briefly trained: expect
Python-looking code and Austen- or Bible-flavoured English, not facts.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ASSETS = Path(__file__).with_name("assets")
MODEL = ASSETS / "demo-finch-L6-C256.pth"
VOCAB = MODEL.with_name(MODEL.stem + ".vocab.txt")  # beside the model: found by rwkvkit.model_args
PROMPTS = (
    "def read_config(path):\n",
    "It is a truth universally acknowledged, that",
    "In the beginning",
    "class Queue:\n    def __init__(self",
)


def _pieces(
    model, tokenizer, prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int
) -> Iterator[str]:
    """Streamed text: ``rwkvkit.generate`` when available, else a plain sampling loop."""
    try:
        from rwkvkit.generation import generate
        from rwkvkit.sampling import SamplingParams
    except ImportError:
        yield from _plain_sampling(model, tokenizer, prompt, max_tokens, temperature, top_p, seed)
        return
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    yield from generate(model, tokenizer, prompt, max_tokens=max_tokens, sampling=params, stream=True)


@torch.no_grad()
def _plain_sampling(
    model, tokenizer, prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int
):
    g = torch.Generator().manual_seed(seed)
    logits, state = model(tokenizer.encode(prompt), last_only=True)
    out: list[int] = []
    shown = ""
    for _ in range(max_tokens):
        p = torch.softmax(logits[0, -1].float() / max(temperature, 1e-6), -1)
        sp, si = torch.sort(p, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        sp = sp * keep
        tok = int(si[torch.multinomial(sp / sp.sum(), 1, generator=g)])
        if tok == 0:
            break
        out.append(tok)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text
        logits, state = model([tok], state)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rwkvkit demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="*", help="prompts (default: a few built-in ones)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--vocab", default=str(VOCAB))
    a = ap.parse_args(argv)
    import rwkvkit

    if not Path(a.model).is_file() or not Path(a.vocab).is_file():
        print(
            f"rwkvkit demo: {a.model} or {a.vocab} is missing; scripts/train_demo.sh trains and installs them",
            file=sys.stderr,
        )
        return 1
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    t = time.time()
    model = rwkvkit.load(a.model)
    tokenizer = rwkvkit.Tokenizer(a.vocab)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# demo model: {cfg.spec.name} L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, "
        f"{n_params / 1e6:.1f}M parameters, loaded in {time.time() - t:.1f}s"
    )
    print(
        "# trained from scratch by `scripts/train_demo.sh` (stdlib sources, Jane Austen, World English Bible)\n"
    )
    for prompt in a.prompts or PROMPTS:
        print("\u2500" * 72)
        print(prompt, end="", flush=True)
        for piece in _pieces(model, tokenizer, prompt, a.max_tokens, a.temperature, a.top_p, a.seed):
            print(piece, end="", flush=True)
        print()
    print("\u2500" * 72)
    return 0


if __name__ == "__main__":
    sys.exit(main())
