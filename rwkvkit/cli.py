"""The ``rwkvkit`` command: one subcommand per job, each a ``main(argv) -> int`` in its own module.

The table below is the whole CLI; modules are imported only when their subcommand runs, so
``rwkvkit --help`` is instant and a missing optional extra only affects the command that needs it.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("rwkvkit.demo:main", "generate text with the small Finch shipped in the repository"),
    "generate": ("rwkvkit.run_cli:generate_main", "continue a prompt with a model"),
    "chat": ("rwkvkit.run_cli:chat_main", "chat with a model in the terminal"),
    "serve": ("rwkvkit.serve:main", "OpenAI-compatible HTTP server"),
    "info": (
        "rwkvkit.info:main",
        "what a checkpoint is and which kernels it runs here (and why not faster ones)",
    ),
    "tokenize": ("rwkvkit.data.tokenize_corpus:main", "text/jsonl files -> binidx token files for training"),
    "train": ("rwkvkit.train.cli:main", "train or fine-tune a model from a YAML config"),
    "eval": ("rwkvkit.eval.cli:main", "lm-evaluation-harness tasks | perplexity FILE... (text files)"),
    "bench": ("", "benchmarks: forward | tokenizer | serve | train | ops | score | sampling | matvec"),
    "experiment": ("rwkvkit.experiments.cli:main", "the paper's experiments: mqar | long-context | speed"),
}

BENCHES: dict[str, str] = {
    "forward": "rwkvkit.bench.forward:main",
    "tokenizer": "rwkvkit.bench.tokenizer:main",
    "serve": "rwkvkit.bench.serve:main",
    "train": "rwkvkit.bench.train:main",
    "ops": "rwkvkit.bench.ops:main",
    "score": "rwkvkit.bench.score:main",
    "sampling": "rwkvkit.bench.sampling:main",
    "matvec": "rwkvkit.bench.matvec:main",
}


def _run(target: str, argv: list[str]) -> int:
    mod, func = target.split(":")
    return int(getattr(importlib.import_module(mod), func)(argv) or 0)


def _usage() -> str:
    lines = ["usage: rwkvkit <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'rwkvkit <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"usage: rwkvkit bench {{{','.join(BENCHES)}}} [options]", file=sys.stderr)
            return 2
        return _run(BENCHES[rest[0]], rest[1:])
    if name not in COMMANDS:
        print(f"rwkvkit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return _run(COMMANDS[name][0], rest)


if __name__ == "__main__":
    sys.exit(main())
