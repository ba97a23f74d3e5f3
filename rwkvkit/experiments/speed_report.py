"""The report of ``rwkvkit experiment speed``: its Markdown tables (CPU time, wall time and peak memory
per operator call; decode latency and memory per sequence against the context) and its plot."""

from __future__ import annotations

from .report import markdown_table


def tables(ops: list[dict], decode: list[dict]) -> str:
    lengths = sorted({r["T"] for r in ops})
    keys = list(dict.fromkeys((r["op"], r["mode"]) for r in ops))

    def cell(op, mode, T, what):
        for r in ops:
            if (r["op"], r["mode"], r["T"]) == (op, mode, T):
                return "OOM" if r.get("oom") else r[what]
        return None

    parts = []
    whats = [("ms", "wall time per call (ms)"), ("peak_mib", "peak memory of the call (MiB)")]
    if any("cpu_ms" in r for r in ops):
        whats.insert(0, ("cpu_ms", "CPU time per call (ms, what the call costs on a shared machine)"))
    for what, title in whats:
        rows = [[f"{op} {mode}", *(cell(op, mode, T, what) for T in lengths)] for op, mode in keys]
        parts.append(
            f"Operators, {title}:\n\n" + markdown_table(["operator", *(f"T={T}" for T in lengths)], rows)
        )
    if not decode:  # --no-decode: no empty table
        return "\n\n".join(parts)
    ctxs = sorted({r["context"] for r in decode})
    rows = []
    for model in ("finch", "transformer"):
        units = [("ms_per_token", "wall ms/token"), ("state_mib", "MiB per sequence")]
        if any("cpu_ms_per_token" in r for r in decode):
            units.insert(0, ("cpu_ms_per_token", "CPU ms/token"))
        for what, unit in units:
            vals = {
                r["context"]: ("OOM" if r.get("oom") else r.get(what)) for r in decode if r["model"] == model
            }
            rows.append([f"{model} {unit}", *(vals.get(c) for c in ctxs)])
    parts.append(
        "Decoding one token after a context of C tokens:\n\n"
        + markdown_table(["", *(f"C={c}" for c in ctxs)], rows)
    )
    return "\n\n".join(parts)


def plot(ops: list[dict], decode: list[dict], title: str, path) -> None:
    """Operator time and memory against T (top row), decode latency and memory per sequence against
    the context (bottom row); a row with nothing measured (``--no-decode``, or no operator that runs
    here) is left out, and a figure with nothing at all is not drawn."""
    import matplotlib.pyplot as plt

    colors = {
        "finch-chunked": "tab:red",
        "finch-native": "darkred",
        "attention": "tab:green",
        "mamba": "tab:purple",
    }
    on_cpu = any("cpu_ms" in r for r in ops)  # a shared CPU: plot what the calls cost, not the waits
    t_op, t_dec = ("cpu_ms", "cpu_ms_per_token") if on_cpu else ("ms", "ms_per_token")
    unit = "CPU ms" if on_cpu else "ms"
    op_rows = [r for r in ops if not r.get("oom")]
    dec_rows = [r for r in decode if not r.get("oom")]
    rows = []  # per row of panels: [(x label, y label, title, [(x, y, style, color, label), ...])] x 2
    if op_rows:
        time_lines, mem_lines = [], []
        for op, mode in dict.fromkeys((r["op"], r["mode"]) for r in op_rows):
            rs = [r for r in op_rows if (r["op"], r["mode"]) == (op, mode)]
            style = "o-" if mode == "fwd" else "s--"
            xs = [r["T"] for r in rs]
            time_lines.append((xs, [r[t_op] for r in rs], style, colors[op], f"{op} {mode}"))
            mem_lines.append((xs, [r["peak_mib"] for r in rs], style, colors[op], f"{op} {mode}"))
        rows.append([("T", f"{unit} per call", "operator time", time_lines),
                     ("T", "MiB", "operator peak memory", mem_lines)])  # fmt: skip
    if dec_rows:
        lat_lines, mem_lines = [], []
        for model, color in (("finch", "tab:red"), ("transformer", "tab:green")):
            rs = [r for r in dec_rows if r["model"] == model]
            if rs:
                xs = [r["context"] for r in rs]
                lat_lines.append((xs, [r[t_dec] for r in rs], "o-", color, model))
                mem_lines.append((xs, [r["state_mib"] for r in rs], "o-", color, model))
        rows.append([("context (tokens)", f"{unit} per token", "decode latency", lat_lines),
                     ("context (tokens)", "MiB", "memory per sequence", mem_lines)])  # fmt: skip
    if not rows:
        return
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.75 * len(rows) + 0.5), squeeze=False)
    for ax_row, panels in zip(axes, rows):
        for ax, (xl, yl, t, lines) in zip(ax_row, panels):
            for xs, ys, style, color, label in lines:
                ax.plot(xs, ys, style, color=color, label=label)
            ax.set_xscale("log", base=2)
            if any(y > 0 for _, ys, *_ in lines for y in ys):  # a log axis needs a positive value
                ax.set_yscale("log")
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_title(t)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
