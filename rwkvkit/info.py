"""``rwkvkit info MODEL``: what a checkpoint is and which code paths it runs on this machine.

Loads the model as ``rwkvkit.load`` would with the given options and prints ``model.describe()``:
version and sizes, dtype, quantisation, and for each part (WKV, element-wise chains, prompt matmuls,
the one-token step, the head) the kernel that runs and, where a faster one is not taken, why.
"""

from __future__ import annotations

import argparse
import sys

from .dtypes import DTYPES, dtype_from_name


def main(argv: list[str] | None = None) -> int:
    """``rwkvkit info MODEL``: describe a model and the kernels it runs."""
    p = argparse.ArgumentParser(prog="rwkvkit info", description=main.__doc__)
    p.add_argument("model", help="checkpoint: a local .pth / .safetensors file or hf://owner/repo/file")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="model dtype (default fp32)")
    p.add_argument("--quantize", default=None, choices=["int8"], help="int8 matrices (Q8_0)")
    p.add_argument("--device", default="cpu")
    for name in ("native-step", "amx-matmul", "fused"):
        p.add_argument(
            f"--no-{name}", action="store_true", help=f"describe with Kernels.{name.replace('-', '_')}=False"
        )
    args = p.parse_args(argv)
    from .checkpoint import load
    from .config import CheckpointError
    from .hub import resolve_model
    from .kernels import Kernels
    from .model_args import check_device

    off = {
        n.replace("-", "_"): False
        for n in ("native-step", "amx-matmul", "fused")
        if getattr(args, "no_" + n.replace("-", "_"))
    }
    try:
        check_device(args.device)
        model = load(
            resolve_model(args.model),
            device=args.device,
            dtype=dtype_from_name(args.dtype),
            quantize=args.quantize,
            kernels=Kernels.default().replace(**off),
        )
    except (OSError, CheckpointError, ValueError, RuntimeError) as e:
        print(f"rwkvkit info: {e}", file=sys.stderr)
        return 1
    print(model.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
