"""``rwkvkit eval``: lm-evaluation-harness tasks on an rwkvkit model, in process.

``rwkvkit eval --model M --tasks T1,T2 [--limit N] [--batch-size B] [--output F]`` prints lm-eval's
table and writes its JSON. A task is named in any of three ways:

- a YAML file of lm-eval's task format, or a folder of them: relative ``data_files`` and
  ``dataset_path`` are read next to the YAML file (so local JSON-lines tasks run from anywhere);
- a task shipped with rwkvkit (``rwkvkit/eval/tasks``: small local files, one per output type,
  e.g. ``rwkvkit_mc``), or ``rwkvkit_local`` for all of them;
- any task of lm-eval's registry (``lambada_openai``, ``piqa``, ``hellaswag``, ``winogrande``,
  ``arc_easy``, ``sciq``...: the paper's), which needs its dataset from the Hugging Face hub or its
  cache. Only then is lm-eval's task index built (it takes a while).

``rwkvkit eval perplexity FILE...`` is ``rwkvkit.eval.perplexity``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..io import check_output
from ..scoring import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_LEN
from .common import add_model_args, load_from_args

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
ALL_LOCAL = "rwkvkit_local"
INSTALL_HINT = (
    "rwkvkit eval needs lm-evaluation-harness: pip install 'rwkvkit[eval]' "
    "(or pip install lm-eval==0.4.13 with the pins of requirements.lock)"
)


class TaskError(ValueError):
    """A task name or file that cannot be used."""


def _local_path(value: str, base: Path) -> str:
    """``value`` resolved against ``base`` when it is a relative path to something that exists there."""
    p = Path(value)
    if p.is_absolute() or "://" in value:
        return value
    candidate = base / p
    return str(candidate) if candidate.exists() else value


def _resolve_paths(config: dict[str, Any], base: Path) -> dict[str, Any]:
    """Point a task config's relative ``data_files`` / ``dataset_path`` at files beside its YAML."""
    kw = config.get("dataset_kwargs")
    if isinstance(kw, dict) and "data_files" in kw:
        files = kw["data_files"]
        if isinstance(files, str):
            kw["data_files"] = _local_path(files, base)
        elif isinstance(files, list):
            kw["data_files"] = [_local_path(f, base) for f in files]
        elif isinstance(files, dict):
            kw["data_files"] = {
                k: ([_local_path(f, base) for f in v] if isinstance(v, list) else _local_path(v, base))
                for k, v in files.items()
            }
    if isinstance(config.get("dataset_path"), str) and config["dataset_path"] not in (
        "json",
        "csv",
        "text",
        "parquet",
    ):
        config["dataset_path"] = _local_path(config["dataset_path"], base)
    return config


def _load_config(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=True)
    except Exception as e:  # noqa: BLE001 - yaml errors, include cycles: name the file
        raise TaskError(f"cannot read task file {str(path)!r}: {e}") from e
    if "task" not in config and "group" not in config:
        raise TaskError(f"{str(path)!r} is not an lm-eval task file (it has no 'task' or 'group' key)")
    return _resolve_paths(config, path.parent)


def shipped_tasks() -> dict[str, Path]:
    """The tasks shipped with rwkvkit: name -> YAML file."""
    import yaml

    out = {}
    for f in sorted(TASKS_DIR.glob("*.yaml")):
        with open(f, encoding="utf-8") as fh:
            name = (yaml.safe_load(fh) or {}).get("task")
        if name:
            out[name] = f
    return out


def task_specs(items: list[str]) -> tuple[list[Any], list[str]]:
    """(what lm-eval's ``simple_evaluate`` takes: config dicts and registry names, the registry
    names alone). Raises TaskError for a missing file or an empty folder."""
    shipped = shipped_tasks()
    specs: list[Any] = []
    names: list[str] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            files = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml"))
            if not files:
                raise TaskError(f"folder {item!r} has no task YAML files")
            specs += [_load_config(f) for f in files]
        elif item.endswith((".yaml", ".yml")):
            if not p.is_file():
                raise TaskError(f"no such task file: {item}")
            specs.append(_load_config(p))
        elif item == ALL_LOCAL:
            specs += [_load_config(f) for f in shipped.values()]
        elif item in shipped:
            specs.append(_load_config(shipped[item]))
        else:
            specs.append(item)
            names.append(item)
    return specs, names


def _write_json(path: str, results: dict[str, Any]) -> None:
    from lm_eval.utils import handle_non_serializable

    from ..io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)

    atomic_write(path, write)


def _limit(v: str) -> float:
    x = float(v)
    if not 0 < x < 1 and not (x >= 1 and x == int(x)):
        raise argparse.ArgumentTypeError(
            f"must be a count of documents (1, 2, ...) or a fraction in (0, 1), got {v}"
        )
    return int(x) if x >= 1 else x


def main(argv: list[str] | None = None) -> int:
    """``rwkvkit eval --model M --tasks T1,T2``: lm-evaluation-harness tasks (``rwkvkit eval perplexity FILE...``: text files)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "perplexity":
        from .perplexity import main as perplexity_main

        return perplexity_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="rwkvkit eval", description=__doc__.split("\n\n")[0],
        epilog="rwkvkit eval perplexity FILE... scores text files (see its --help).",
    )  # fmt: skip
    p.add_argument("--tasks", required=True, help="comma-separated task names, task YAML files or folders")
    add_model_args(p)
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="contexts scored or decoded together"
    )
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--output", default=None, help="write lm-eval's results JSON to this file")
    p.add_argument("--force", action="store_true", help="let --output replace an existing file")
    p.add_argument(
        "--log-samples", action="store_true", help="include every request and response in the JSON"
    )
    p.add_argument(
        "--context-prefix",
        default="\n",
        help="text before every context (default '\\n', as RWKV's own evaluations)",
    )
    p.add_argument(
        "--max-gen-toks", type=int, default=256, help="default token budget of generate_until tasks"
    )
    p.add_argument(
        "--chunk-len", type=int, default=DEFAULT_CHUNK_LEN, help="tokens per model call for long texts"
    )
    p.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100000,
        help="lm-eval's bootstrap for the stderr of non-mean metrics",
    )
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's seeds (few-shot sampling and the rest)")
    args = p.parse_args(argv)
    if args.batch_size <= 0 or args.chunk_len <= 0 or args.max_gen_toks <= 0:
        p.error("--batch-size, --chunk-len and --max-gen-toks must be positive")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        p.error(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    items = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not items:
        p.error("--tasks is empty")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from ..hub import ModelNotFound
    from .harness import RWKVLM

    try:
        if args.output:
            check_output(args.output, "--output", force=args.force, inputs=(args.model,))
        specs, names = task_specs(items)
        manager = TaskManager(include_defaults=bool(names))
        unknown = [n for n in names if not manager.match_tasks([n])]
        if unknown:
            raise TaskError(
                f"unknown task {unknown[0]!r}: not a task file or folder, not one of rwkvkit's "
                f"({', '.join([*shipped_tasks(), ALL_LOCAL])}), not in lm-eval's registry"
            )
        model, tokenizer = load_from_args(args)
    except (TaskError, ModelNotFound, ValueError, FileNotFoundError) as e:
        print(f"rwkvkit eval: {e}", file=sys.stderr)
        return 2
    lm = RWKVLM(model, tokenizer, batch_size=args.batch_size, context_prefix=args.context_prefix,
                max_gen_toks=args.max_gen_toks, chunk_len=args.chunk_len)  # fmt: skip
    try:
        results = simple_evaluate(
            model=lm, tasks=specs, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=manager,
            bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples, random_seed=args.seed,
            numpy_random_seed=args.seed, torch_random_seed=args.seed, fewshot_random_seed=args.seed,
        )  # fmt: skip
    except ConnectionError as e:  # a task's dataset is on the hub, and the hub is out of reach
        print(f"rwkvkit eval: a task's dataset could not be fetched ({str(e).splitlines()[0]}); offline, "
              "lm-eval reads datasets from its cache (HF_DATASETS_OFFLINE=1) or local task files (--tasks "
              "FILE.yaml or a folder; rwkvkit_local runs offline)", file=sys.stderr)  # fmt: skip
        return 1
    if results is None:
        print("rwkvkit eval: lm-eval returned no results", file=sys.stderr)
        return 1
    results.setdefault("config", {})["model"] = f"rwkvkit:{args.model}"
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.output:
        _write_json(args.output, results)
        print(f"results written to {args.output}")
    return 0
