"""``rwkvkit experiment <name> [options]``: dispatch to the experiment modules (imported on demand)."""

from __future__ import annotations

import importlib
import sys

EXPERIMENTS: dict[str, tuple[str, str]] = {
    "mqar": ("rwkvkit.experiments.mqar", "multi-query associative recall (the paper's Figure 4)"),
    "long-context": ("rwkvkit.experiments.long_context", "loss against position on held-out books"),
    "speed": ("rwkvkit.experiments.speed", "operator time and memory against T; decode latency and memory"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        lines = [
            "usage: rwkvkit experiment <name> [--preset toy|cpu|gpu (default: cpu, about an hour)] [options]",
            "",
            "experiments:",
        ]
        lines += [f"  {name:<13} {help_}" for name, (_, help_) in EXPERIMENTS.items()]
        lines += ["", "Run 'rwkvkit experiment <name> --help' for its options."]
        print("\n".join(lines), file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(EXPERIMENTS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
