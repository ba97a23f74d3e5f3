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
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    colors = {
        "finch-chunked": "tab:red",
        "finch-native": "darkred",
        "attention": "tab:green",
        "mamba": "tab:purple",
    }
    on_cpu = any("cpu_ms" in r for r in ops)  # a shared CPU: plot what the calls cost, not the waits
    t_op, t_dec = ("cpu_ms", "cpu_ms_per_token") if on_cpu else ("ms", "ms_per_token")
    for op, mode in dict.fromkeys((r["op"], r["mode"]) for r in ops):
        rs = [r for r in ops if (r["op"], r["mode"]) == (op, mode) and not r.get("oom")]
        style = "o-" if mode == "fwd" else "s--"
        for ax, what in ((axes[0][0], t_op), (axes[0][1], "peak_mib")):
            ax.plot(
                [r["T"] for r in rs], [r[what] for r in rs], style, color=colors[op], label=f"{op} {mode}"
            )
    for model, color in (("finch", "tab:red"), ("transformer", "tab:green")):
        rs = [r for r in decode if r["model"] == model and not r.get("oom")]
        axes[1][0].plot([r["context"] for r in rs], [r[t_dec] for r in rs], "o-", color=color, label=model)
        axes[1][1].plot(
            [r["context"] for r in rs], [r["state_mib"] for r in rs], "o-", color=color, label=model
        )
    unit = "CPU ms" if on_cpu else "ms"
    labels = [("T", f"{unit} per call", "operator time"), ("T", "MiB", "operator peak memory"),
              ("context (tokens)", f"{unit} per token", "decode latency"), ("context (tokens)", "MiB", "memory per sequence")]  # fmt: skip
    for ax, (xl, yl, t) in zip(axes.flat, labels):
        ax.set_xscale("log", base=2)
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
