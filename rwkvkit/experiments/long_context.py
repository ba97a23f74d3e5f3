"""``rwkvkit experiment long-context``: loss against position on held-out books (the paper's PG19 plot, small).

The paper trains RWKV-4, Eagle and Finch at a fixed context and plots the loss on PG19's test books
against the token position, far beyond the training context. Here, offline:

- Books: the six Jane Austen novels (Debian ``r-cran-janeaustenr``) and the World English Bible's two
  testaments (``sword-text-web``), read by ``rwkvkit.data.corpora``. Whole books are held out
  (``Preset.held_out``: *Persuasion* and the New Testament); the others are the training data.
- Tokens: a small vocabulary cut from the World vocabulary on the training books only
  (``rwkvkit.train.vocab.subset_vocab``), the same greedy tokenizer for every book.
- Training: the three versions at one size, the same data order and steps, through rwkvkit's own
  ``Trainer`` (RWKV-LM's recipe) at ``ctx_len``.
- Evaluation: up to ``n_windows`` windows of ``eval_len`` tokens from the held-out books, starting
  every ``eval_stride`` tokens (overlapping), each read from its first token with a fresh state (in
  chunks, the state carried, which is exact); the per-position loss is averaged over the windows,
  then over log-spaced position bins.

Outputs: ``long-context-<preset>.{json,md,png}`` (the plot has a log x axis and marks the training
context); checkpoints and token files go to ``--work`` (not meant to be committed).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rwkvkit.cli_args import csv_choices, positive_int

from .models import LABELS
from .report import (
    Progress,
    add_common_args,
    check_results,
    finish_info,
    markdown_table,
    run_info,
    write_results,
)

VERSIONS = {"rwkv4": 4, "eagle": 5, "finch": 6}


# ---- books --------------------------------------------------------------------------------------


def read_books() -> dict[str, str]:
    """name -> text of every book available offline (empty when the Debian packages are missing)."""
    from rwkvkit.data.corpora import AUSTEN_DIRS, read_r_lazyload, world_english_bible

    books: dict[str, str] = {}
    for d in AUSTEN_DIRS:
        prefix = Path(d) / "data" / "Rdata"
        if Path(str(prefix) + ".rdb").is_file():
            for name, obj in sorted(read_r_lazyload(prefix).items()):
                if isinstance(obj, list) and obj and all(isinstance(s, str) or s is None for s in obj):
                    books[f"austen/{name}"] = "\n".join(s or "" for s in obj).strip() + "\n"
            break
    for name, text in zip(("web/old-testament", "web/new-testament"), world_english_bible()):
        books[name] = text
    return books


def split_books(books: dict[str, str], held_out: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """(training books, held-out books); every held-out name must exist and the two never share a book."""
    held = list(held_out)
    missing = [n for n in held if n not in books]
    if missing:
        raise ValueError(f"held-out book(s) {missing} not found; available: {sorted(books)}")
    train = {n: t for n, t in books.items() if n not in held}
    if not train:
        raise ValueError("no training books left after holding out " + ", ".join(held))
    return train, {n: books[n] for n in held}


def encode_books(
    train: dict[str, str], test: dict[str, str], vocab_size: int
) -> tuple[list[bytes], np.ndarray, dict[str, np.ndarray]]:
    """A vocabulary cut on the training books only; the training stream (books joined, each ended by
    token 0, uint16) and the token ids of each held-out book."""
    from rwkvkit.train.vocab import _encoder, subset_vocab

    vocab = subset_vocab(train.values(), vocab_size)
    encode = _encoder(vocab)
    ids: list[int] = []
    for text in train.values():
        ids.extend(encode(text))
        ids.append(0)
    held = {n: np.asarray(encode(t), dtype=np.int64) for n, t in test.items()}
    return vocab, np.asarray(ids, dtype=np.uint16), held


def eval_windows(
    held: dict[str, np.ndarray], eval_len: int, n_windows: int, stride: int = 0
) -> list[tuple[str, int]]:
    """Up to ``n_windows`` (book, start) windows of ``eval_len + 1`` tokens, starting every ``stride``
    tokens of each held-out book (default: ``eval_len``, no overlap), taken from the books in turn so
    that every long enough book contributes. Overlapping windows put different text at each position:
    the early positions are then averaged over many passages instead of a few."""
    step = stride or eval_len
    per_book = {n: list(range(0, len(t) - eval_len, step)) for n, t in held.items()}
    if not any(per_book.values()):
        longest = max((len(t) for t in held.values()), default=0)
        raise ValueError(f"no held-out book has {eval_len + 1} tokens (longest: {longest})")
    out: list[tuple[str, int]] = []
    while len(out) < n_windows and any(per_book.values()):
        for n in sorted(per_book):
            if per_book[n] and len(out) < n_windows:
                out.append((n, per_book[n].pop(0)))
    return out


# ---- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def position_losses(model, tokens: np.ndarray, device: torch.device, chunk: int = 2048) -> np.ndarray:
    """Per-position next-token loss [len - 1] of one window read from a fresh state, in chunks."""
    model.eval()
    x = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)[None]
    out, state = [], None
    for a in range(0, x.shape[1] - 1, chunk):
        b = min(a + chunk, x.shape[1] - 1)
        logits, state = model(x[:, a:b], state)
        out.append(F.cross_entropy(logits[0].float(), x[0, a + 1 : b + 1], reduction="none").cpu())
    return torch.cat(out).numpy()


def log_bins(length: int, n_bins: int) -> list[tuple[int, int]]:
    """Log-spaced [lo, hi) position bins over 1 .. length (positions counted from 1)."""
    edges = np.unique(np.round(np.logspace(0, np.log10(length + 1), n_bins + 1)).astype(int))
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def binned(curve: np.ndarray, bins: list[tuple[int, int]]) -> list[float]:
    """Mean loss inside each bin (position p is curve[p - 1])."""
    return [float(curve[a - 1 : b - 1].mean()) for a, b in bins]


# ---- presets and the experiment -----------------------------------------------------------------


@dataclass
class Preset:
    n_layer: int
    n_embd: int
    vocab_size: int
    ctx_len: int
    micro_bsz: int
    max_steps: int
    lr_init: float
    lr_final: float
    eval_len: int
    n_windows: int
    eval_stride: int  # windows start every eval_stride tokens of a held-out book (overlapping)
    held_out: list[str] = field(default_factory=lambda: ["austen/persuasion", "web/new-testament"])
    models: list[str] = field(default_factory=lambda: list(VERSIONS))
    warmup_steps: int = 50
    head_size: int = 64
    precision: str = "auto"
    bands: list[int] = field(default_factory=lambda: [1, 128, 512, 2048, 8192, 16384])


PRESETS_LC: dict[str, Preset] = {
    "toy": Preset(
        n_layer=1, n_embd=32, vocab_size=300, ctx_len=32, micro_bsz=2, max_steps=3, lr_init=1e-3,
        lr_final=1e-4, eval_len=96, n_windows=4, eval_stride=48, warmup_steps=1,
        bands=[1, 8, 32, 64, 96],
    ),
    "cpu": Preset(
        n_layer=4, n_embd=128, vocab_size=4096, ctx_len=512, micro_bsz=4, max_steps=360,
        lr_init=2e-3, lr_final=1e-4, eval_len=16384, n_windows=24, eval_stride=2048, warmup_steps=30,
    ),
    "gpu": Preset(
        n_layer=12, n_embd=768, vocab_size=16384, ctx_len=2048, micro_bsz=8, max_steps=2000,
        lr_init=6e-4, lr_final=6e-5, eval_len=65536, n_windows=32, eval_stride=8192, warmup_steps=100,
        bands=[1, 128, 512, 2048, 8192, 32768, 65536],
    ),
}  # fmt: skip


def train_one(
    kind: str,
    preset: Preset,
    data: Path,
    vocab_size: int,
    work: Path,
    device: torch.device,
    seed: int,
    threads: int,
    resume: bool = False,
    overwrite: bool = False,
):
    """Train one model with rwkvkit's Trainer; returns (the fp32 model, the trainer's summary).
    ``resume`` continues the run saved in ``work/kind`` (when there is one), ``overwrite`` discards it."""
    from rwkvkit.train.config import ModelSection, TrainConfig
    from rwkvkit.train.trainer import Trainer

    cfg = TrainConfig(
        model=ModelSection(
            version=VERSIONS[kind], n_layer=preset.n_layer, n_embd=preset.n_embd,
            head_size=min(preset.head_size, preset.n_embd), vocab_size=vocab_size,
        ),
        data=str(data), val_fraction=0.0, ctx_len=preset.ctx_len,
        micro_bsz=preset.micro_bsz, seed=seed, lr_init=preset.lr_init, lr_final=preset.lr_final,
        warmup_steps=min(preset.warmup_steps, preset.max_steps), max_steps=preset.max_steps,
        device=str(device), precision=preset.precision, threads=threads, out_dir=str(work / kind),
        save_every=preset.max_steps, eval_every=0, log_every=1, progress=True,
    )  # fmt: skip
    trainer = Trainer(cfg)
    summary = trainer.fit(resume=resume and (work / kind / "train_state.pt").is_file(), overwrite=overwrite)
    return trainer.base, summary


def run(
    preset: Preset,
    device: torch.device,
    seed: int,
    work: Path,
    threads: int,
    progress: Progress,
    books: dict[str, str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train every model of the preset and measure its held-out loss by position (``books``: name ->
    text, default ``read_books()``; ``resume`` / ``overwrite``: what to do with a training run already
    in ``work``, see ``train_one``)."""
    books = read_books() if books is None else books
    if not books:
        raise RuntimeError(
            "no books found: install them with `apt-get install r-cran-janeaustenr sword-text-web` "
            "(Jane Austen's novels and the World English Bible)"
        )
    train, test = split_books(books, preset.held_out)
    progress.say(f"training books {sorted(train)}; held out {sorted(test)}")
    vocab, stream, held = encode_books(train, test, preset.vocab_size)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train_tokens.npy"
    np.save(data, stream)
    windows = eval_windows(held, preset.eval_len, preset.n_windows, preset.eval_stride)
    progress.say(
        f"{len(stream):,} training tokens; {len(windows)} windows of {preset.eval_len} held-out tokens"
    )
    bins = log_bins(preset.eval_len, 48)
    progress.total = len(preset.models)
    results = {}
    for kind in preset.models:
        t0, c0 = time.time(), time.process_time()
        model, summary = train_one(
            kind, preset, data, len(vocab), work, device, seed, threads, resume, overwrite
        )
        t_train, c_train = time.time() - t0, time.process_time() - c0
        curves = [position_losses(model, held[b][s : s + preset.eval_len + 1], device) for b, s in windows]
        curve = np.mean(curves, axis=0)
        bands = list(zip(preset.bands[:-1], preset.bands[1:]))
        results[kind] = {
            "params": sum(p.numel() for p in model.parameters()),
            "train_s": t_train,
            "train_cpu_s": c_train,
            "eval_s": time.time() - t0 - t_train,
            "final_train_loss": _last_loss(work / kind),
            "steps": summary["step"],
            "bins": bins,
            "binned_loss": binned(curve, bins),
            "bands": [{"from": a, "to": b, "loss": float(curve[a - 1 : b - 1].mean())} for a, b in bands],
        }
        progress.advance(1)
        progress.say(
            f"{kind}: trained {summary['step']} steps in {t_train:.0f} s; held-out loss "
            + ", ".join(f"[{a},{b}) {curve[a - 1 : b - 1].mean():.3f}" for a, b in bands)
        )
    return {
        "books": {
            "train": {n: len(t) for n, t in train.items()},
            "held_out": {n: len(t) for n, t in test.items()},
        },
        "train_tokens": int(len(stream)),
        "held_out_tokens": {n: int(len(t)) for n, t in held.items()},
        "windows": windows,
        "models": results,
    }


def _last_loss(run_dir: Path) -> float | None:
    from rwkvkit.train.metrics import read_metrics

    recs = read_metrics(run_dir)
    return recs[-1]["loss"] if recs else None


def table(preset: Preset, out: dict) -> str:
    bands = list(zip(preset.bands[:-1], preset.bands[1:]))
    headers = ["model", "params"] + [f"loss @ [{a}, {b})" for a, b in bands] + ["train loss (last)"]
    rows = []
    for kind, r in out["models"].items():
        rows.append([LABELS[kind], r["params"], *(b["loss"] for b in r["bands"]), r["final_train_loss"]])
    return markdown_table(headers, rows)


def plot(preset: Preset, out: dict, path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = {"rwkv4": "tab:gray", "eagle": "tab:blue", "finch": "tab:red"}
    for kind, r in out["models"].items():
        mid = [np.sqrt(a * b) for a, b in r["bins"]]
        ax.plot(
            mid, r["binned_loss"], "-", color=colors[kind], label=f"{LABELS[kind]} ({r['params'] / 1e6:.1f}M)"
        )
    ax.axvline(preset.ctx_len, color="k", ls=":", lw=1, label=f"training context {preset.ctx_len}")
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(
        f"Held-out books: {len(out['windows'])} windows of {preset.eval_len} tokens, one every {preset.eval_stride}"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_work(work: Path, models: list[str], resume: bool, overwrite: bool) -> None:
    """Before any training: ``work`` can be a folder, and a model's folder in it that already holds a
    training run is continued (``resume``) or discarded (``overwrite``), never silently refused at
    that model's turn. A ValueError names the problem and the experiment's flags."""
    from rwkvkit.cli_args import check_folder
    from rwkvkit.train.run_dir import run_files

    check_folder(work, "--work")
    if resume and overwrite:
        raise ValueError(
            "--resume continues the trainings in the work folder and --overwrite discards them: pick one"
        )
    held = [k for k in models if run_files(work / k)]
    if held and not (resume or overwrite):
        raise ValueError(
            f"the work folder {str(work)!r} already holds training runs of {', '.join(held)}: "
            "--resume continues them, --overwrite starts them afresh (or pass another --work)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rwkvkit experiment long-context", description=__doc__.split("\n\n")[0])
    add_common_args(
        p,
        "long-context",
        overwrite_help="replace a result already in --out and start the trainings in --work afresh",
    )
    p.add_argument(
        "--work",
        default="",
        help="folder for token files and checkpoints (default: runs/experiments/long-context-<preset>-work)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the trainings saved in --work (start the models it has none of) and replace the result",
    )
    p.add_argument(
        "--models", type=csv_choices(list(VERSIONS)), default=None,
        help="comma-separated subset of " + ",".join(VERSIONS),
    )  # fmt: skip
    p.add_argument(
        "--max-steps", type=positive_int, default=None, help="cap the training steps (smoke tests)"
    )
    p.add_argument(
        "--max-windows", type=positive_int, default=None, help="cap the evaluation windows (smoke tests)"
    )
    p.add_argument(
        "--max-eval-len",
        type=positive_int,
        default=None,
        help="cap the evaluation window length (smoke tests)",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=None,
        help="cap the sequences per step (smoke tests: the gpu preset's 8 x 2048 tokens need ~24 GB on a CPU)",
    )
    a = p.parse_args(argv)
    argv = list(argv or [])
    name = f"long-context-{a.preset}"
    preset = replace(PRESETS_LC[a.preset])
    if a.models:
        preset.models = a.models
    work = Path(a.work or f"runs/experiments/long-context-{a.preset}-work")
    try:
        check_results(a.out, name, a.overwrite or a.resume)
        check_work(work, preset.models, a.resume, a.overwrite)
    except ValueError as e:
        p.error(str(e))
    if a.threads:
        torch.set_num_threads(a.threads)
    device = a.device
    if a.max_steps:
        preset.max_steps = min(preset.max_steps, a.max_steps)
    if a.max_batch:
        preset.micro_bsz = min(preset.micro_bsz, a.max_batch)
    if a.max_windows:
        preset.n_windows = min(preset.n_windows, a.max_windows)
    if a.max_eval_len and a.max_eval_len < preset.eval_len:
        preset.eval_len = a.max_eval_len
        preset.bands = [b for b in preset.bands if b < a.max_eval_len] + [a.max_eval_len]
    info = run_info("long-context", argv, a.seed, a.preset, device)
    progress = Progress("long-context", enabled=not a.quiet)
    t0, c0 = time.time(), time.process_time()
    out = run(preset, device, a.seed, work, a.threads, progress, resume=a.resume, overwrite=a.overwrite)
    finish_info(info, t0, c0)
    text = table(preset, out)
    print(text)
    payload = {"info": info, "preset": asdict(preset), "results": out}
    paths = write_results(a.out, name, payload, text, lambda path: plot(preset, out, path))
    progress.say("wrote " + ", ".join(str(v) for v in paths.values()))
    return 0
