"""``rwkvkit train``: train or fine-tune from a YAML config with command-line overrides.

    rwkvkit train --config configs/tiny_cpu.yaml
    rwkvkit train --config configs/finch_0.1b_gpu.yaml --set lr_init=3e-4 --set micro_bsz=8
    rwkvkit train --config configs/tiny_cpu.yaml model.version=7 model.n_layer=4   # the model section
    rwkvkit train --config configs/lora.yaml --mode lora --load model.pth data=tokens.npy
    torchrun --nproc_per_node 2 -m rwkvkit.train.cli --config cfg.yaml strategy=ddp
    rwkvkit train --config cfg.yaml --resume        # continue a killed run from out_dir/train_state.pt
    rwkvkit train --config cfg.yaml --overwrite     # discard the run in out_dir and start again

Overrides are ``key=value`` (after ``--set`` or bare, anywhere on the line), values parsed as YAML;
every key is a field of ``rwkvkit.train.config.TrainConfig`` (``--help`` lists them with what each
does); the model's keys live in its section, ``model.<key>`` on the command line. ``--print-config`` shows the resolved config and exits. A problem with the config, the data,
the vocabulary or the run folder is one line naming it (exit status 2), not a traceback; so is a run
that diverges or cannot write a checkpoint (exit status 1, the checkpoints saved before it intact).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from .config import MODES, field_help, load_config


def _keys_help() -> str:
    lines = ["config keys (key=value; default in brackets):"]
    for name, (default, comment) in field_help().items():
        if default is None:  # a version's own size
            shown = "version's default"
        else:
            shown = json.dumps(default) if not isinstance(default, str) else repr(default)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        text = f"{name} [{shown}]" + (f": {comment}" if comment else "")
        lines += textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="rwkvkit train",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_keys_help(),
    )
    ap.add_argument("--config", "-c", help="YAML file of TrainConfig fields")
    ap.add_argument("--mode", choices=MODES, help="full | lora | state (overrides the config)")
    ap.add_argument("--load", help="checkpoint to start from (fine-tuning)")
    ap.add_argument("--data", help="token file (binidx prefix, .npy or .bin)")
    ap.add_argument("--out-dir", help="run folder for checkpoints, metrics and the loss curve")
    ap.add_argument("--resume", action="store_true", help="continue the run in out_dir (from train_state.pt)")
    ap.add_argument(
        "--overwrite", action="store_true", help="discard the run already in out_dir and start again"
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more overrides")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may come before or after the flags
    overrides = list(args.set) + list(args.overrides)
    for key in ("mode", "load", "data", "out_dir"):
        val = getattr(args, key)
        if val is not None:
            overrides.append(f"{key}={val}")
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, OSError) as e:
        print(f"rwkvkit train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    from .trainer import Trainer

    try:  # everything that can be wrong before the first step: config, data, vocabulary, run folder
        trainer = Trainer(cfg)
        trainer.prepare(resume=args.resume, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        print(f"rwkvkit train: {e}", file=sys.stderr)
        return 2
    try:  # what can go wrong once training runs: divergence, a checkpoint that cannot be written
        summary = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    except (FloatingPointError, OSError) as e:
        print(f"rwkvkit train: {e}", file=sys.stderr)
        return 1
    if summary.get("checkpoint") is not None:
        print(json.dumps({k: str(v) if k == "checkpoint" else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
