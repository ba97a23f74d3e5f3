"""What every experiment writes: run metadata, raw JSON, a Markdown table, progress lines, PNG plots.

- ``run_info``: the command line, seed, preset, software versions and machine (CPU model, cores,
  threads, GPU) of a run, stored beside its results.
- ``Progress``: one line per event on stderr, with the elapsed time and an ETA when the amount of
  work is known (plain lines, so a run logging to a file stays readable).
- ``write_results``: ``<name>.json`` (atomic), ``<name>.md`` (the table) and the plot ``<name>.png``.
- ``markdown_table``: a list of rows as a Markdown table (also what the command prints).

Plots use matplotlib's Agg backend (the ``train`` extra pins matplotlib); without it the JSON and
table are still written and a warning says why the PNG is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

PRESETS = ("toy", "cpu", "gpu")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def run_info(experiment: str, argv: Sequence[str], seed: int, preset: str, device: torch.device) -> dict:
    """Everything needed to rerun and judge a run, stored next to its results."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "experiment": experiment,
        "command": "rwkvkit experiment " + " ".join(shlex.quote(a) for a in [experiment, *argv]),
        "preset": preset,
        "seed": seed,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "rwkvkit": _version("rwkvkit"),
            "numpy": _version("numpy"),
            "matplotlib": _version("matplotlib"),
            "mamba_ssm": _version("mamba-ssm"),
        },
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "gpu": gpu,
            "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
    }


def finish_info(info: dict, t0: float, c0: float) -> dict:
    """Add the run's wall and CPU seconds (``t0``/``c0``: ``time.time()``/``time.process_time()`` at its
    start) and the load average at its end: on a shared machine the wall time alone misleads."""
    info["wall_s"] = time.time() - t0
    info["cpu_s"] = time.process_time() - c0
    info["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info


class Progress:
    """Progress lines on stderr: ``[mqar 00:12:03] finch d=64 T=64: step 200/2000 loss 1.23 (ETA 00:40:00)``."""

    def __init__(self, name: str, total: float | None = None, stream=None, enabled: bool = True) -> None:
        self.name, self.total, self.done = name, total, 0.0
        self.t0 = time.time()
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled

    @staticmethod
    def _clock(s: float) -> str:
        s = int(s)
        return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"

    def advance(self, amount: float) -> None:
        """Count ``amount`` units of the known total as done (for the ETA)."""
        self.done += amount

    def say(self, msg: str) -> None:
        if not self.enabled:
            return
        el = time.time() - self.t0
        eta = ""
        if self.total and 0 < self.done < self.total:
            eta = f" (ETA {self._clock(el * (self.total - self.done) / self.done)})"
        print(f"[{self.name} {self._clock(el)}] {msg}{eta}", file=self.stream, flush=True)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table: floats with 0-3 decimals by size, ints with thousands separators, None as "—"."""

    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(
    out_dir: str | Path,
    name: str,
    payload: dict,
    table: str,
    plot: Callable[[Path], None] | None = None,
) -> dict[str, Path]:
    """Write ``name.json`` (payload), ``name.md`` (table) and ``name.png`` (``plot(path)``) in out_dir."""
    from rwkvkit.io import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "table": out / f"{name}.md"}
    text = json.dumps(payload, indent=1, default=_json_default) + "\n"
    atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(text))
    atomic_write(paths["table"], lambda tmp: Path(tmp).write_text(table + "\n"))
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
        except ImportError:
            warnings.warn(
                "matplotlib is not installed (pip install 'rwkvkit[train]'): no PNG written", stacklevel=2
            )
            return paths
        paths["png"] = out / f"{name}.png"
        plot(paths["png"])
    return paths


def _json_default(o: Any) -> Any:
    if isinstance(o, (Path, torch.device, torch.dtype)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else through ``model_args.check_device``
    (ValueError naming the problem for an unknown name or an unavailable GPU)."""
    from rwkvkit.model_args import check_device

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name)


def _device_arg(v: str) -> torch.device:
    try:
        return pick_device(v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None


_device_arg.__name__ = "device"


def add_common_args(
    p: argparse.ArgumentParser, name: str, overwrite_help: str = "replace a result already in --out"
) -> None:
    """The options every experiment has: --preset (default cpu), --out, --overwrite, --seed,
    --device (parsed to a torch device), --threads and --quiet."""
    from rwkvkit.cli_args import non_negative_int

    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="cpu",
        help="toy: seconds (tests); cpu: about an hour on a 2-core CPU; gpu: the paper's scale (default: cpu)",
    )
    p.add_argument(
        "--out",
        default="runs/experiments",
        help=f"folder for {name}-<preset>.{{json,md,png}} (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--device", type=_device_arg, default="auto", help="auto | cpu | cuda | cuda:N (default: auto)"
    )
    p.add_argument(
        "--threads", type=non_negative_int, default=0, help="torch CPU threads (0: leave the default)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def check_results(out_dir: str | Path, name: str, overwrite: bool) -> None:
    """Before the work: ``out_dir`` can hold ``name.{json,md,png}`` and none of them exists unless
    ``overwrite`` (a ValueError naming the first problem)."""
    from rwkvkit.cli_args import check_folder
    from rwkvkit.io import check_output

    out = check_folder(out_dir, "--out")
    if not out.is_dir():
        return
    for ext in ("json", "md", "png"):
        check_output(out / f"{name}.{ext}", "result", force=overwrite, hint="--overwrite replaces it")
