"""Training metrics: an append-only JSONL log and a loss-curve PNG, both in the run's folder.

``metrics.jsonl`` holds one JSON object per logged step (``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens``, ``tok_s``, and ``val_loss`` when validation ran). A resumed run first drops the records
after the step it resumes from, so the log reads as one uninterrupted run. ``loss.png`` plots the
training loss (raw and smoothed) and the validation loss against tokens seen (matplotlib, Agg
backend; skipped with a warning if matplotlib is missing).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return out


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True, keep_upto: int = 0) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= keep_upto] if keep_upto else []
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> Path | None:
        if not self.enabled:
            return None
        return plot_metrics(read_metrics(self.path), self.dir / "loss.png")


def plot_metrics(records: list[dict], png: str | Path, title: str = "RWKV training") -> Path | None:
    """Training (raw + EMA) and validation loss against tokens; returns the PNG path."""
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss.png (pip install matplotlib)", stacklevel=2)
        return None
    tok = [r["tokens"] / 1e6 for r in records]
    loss = [r["loss"] for r in records]
    ema, s = [], None
    for v in loss:
        s = v if s is None else 0.95 * s + 0.05 * v
        ema.append(s)
    val = [(r["tokens"] / 1e6, r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(tok, loss, color="tab:blue", alpha=0.25, lw=0.8, label="train")
    ax.plot(tok, ema, color="tab:blue", lw=1.5, label="train (EMA)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:red", ms=3, label="validation")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(png)
    return png


def combine_runs(run_dirs: list[str | Path]) -> list[dict]:
    """The records of runs that continue one another as one log: steps and tokens of each later
    run are offset by where the previous one ended, and each record is tagged with its ``run``."""
    out: list[dict] = []
    step0 = tok0 = 0
    for i, d in enumerate(run_dirs):
        recs = read_metrics(d)
        for r in recs:
            out.append({**r, "step": r["step"] + step0, "tokens": r["tokens"] + tok0, "run": i})
        if recs:
            step0, tok0 = out[-1]["step"], out[-1]["tokens"]
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m rwkvkit.train.metrics OUT_PREFIX RUN_DIR [RUN_DIR ...]``: one log and curve for runs
    that continue one another (``OUT_PREFIX-metrics.jsonl``, ``OUT_PREFIX-loss.png``)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print(main.__doc__, file=sys.stderr)
        return 2
    prefix, runs = args[0], args[1:]
    recs = combine_runs(runs)
    Path(prefix + "-metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    plot_metrics(recs, prefix + "-loss.png", title="rwkvkit demo model: Finch L6 C256, CPU training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
