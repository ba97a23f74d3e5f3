"""The `rwkv` package (0.8.32), the reference, timed in a child process per JIT setting.

The package reads its configuration (``RWKV_JIT_ON``, ``RWKV_CUDA_ON``) from the environment once, at
import, so each setting needs a fresh process: ``measure(...)`` starts ``python -m
rwkvkit.bench.reference`` with the setting in its environment and reads back prefill and decode
tokens/s per strategy (and, for 'cpu fp32', the logits of the first 64 prompt tokens, for the quality
column). As shipped the JIT is on (``RWKV_JIT_ON=1`` is its default); rwkvkit's own tests run it off.
RWKV-7 files run with ``RWKV_V7_ON=1`` (the package's x070 class, whose CPU prefill is a per-token
loop); that class scripts its functions with TorchScript in both settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

STRATEGIES = ("cpu fp32", "cpu bf16")


def measure(
    path: str, prompt: list[int], decode: int, repeat: int, jit: bool, version: int = 6
) -> tuple[list[tuple[str, float, float]], torch.Tensor | None]:
    """([(strategy, prefill tok/s, decode tok/s)], fp32 logits [64, V] or None) for one JIT setting;
    ([], None) when the package is not installed. ``version`` 7 sets ``RWKV_V7_ON=1`` (the x070
    class; it scripts its functions with TorchScript whatever ``RWKV_JIT_ON`` says)."""
    env = dict(os.environ, RWKV_JIT_ON="1" if jit else "0", RWKV_CUDA_ON="0")
    env["RWKV_V7_ON"] = "1" if version == 7 else "0"
    with tempfile.TemporaryDirectory(prefix="rwkvkit-ref-") as tmp:
        spec = dict(path=path, prompt=prompt, decode=decode, repeat=repeat, threads=torch.get_num_threads())
        spec_path, logits_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "logits.pt")
        with open(spec_path, "w") as f:
            json.dump(dict(spec, logits=logits_path), f)
        cmd = [sys.executable, "-m", "rwkvkit.bench.reference", spec_path]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode == 3:
            return [], None
        if out.returncode != 0:
            raise RuntimeError(
                f"the reference run failed (JIT {'on' if jit else 'off'}):\n{out.stderr[-2000:]}"
            )
        rows = [tuple(r) for r in json.loads(out.stdout.strip().splitlines()[-1])]
        logits = torch.load(logits_path, weights_only=True) if os.path.exists(logits_path) else None
    return rows, logits


def _child(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    try:
        from rwkv.model import RWKV as RefRWKV  # reads RWKV_JIT_ON / RWKV_CUDA_ON now
    except ImportError:
        return 3
    from .limits import _best

    prompt, n_dec = spec["prompt"], spec["decode"]
    rows = []
    for strat in STRATEGIES:
        name = spec["path"][: -len(".pth")]
        if os.environ.get("RWKV_V7_ON") == "1":  # RWKV is the x070 class, which takes no verbose
            ref = RefRWKV(name, strat)
        else:
            ref = RefRWKV(model=name, strategy=strat, verbose=False)
        with torch.no_grad():
            t_pre = _best(lambda ref=ref: ref.forward(prompt, None), spec["repeat"])
            _, st = ref.forward(prompt, None)

            def dec(ref=ref, st=st) -> None:
                s = [x.clone() for x in st]
                for t in prompt[:n_dec]:
                    _, s = ref.forward([t], s)

            t_dec = _best(dec, spec["repeat"]) / n_dec
            if strat == "cpu fp32":
                torch.save(ref.forward(prompt[:64], None, full_output=True)[0].float(), spec["logits"])
        rows.append((strat, len(prompt) / t_pre, 1 / t_dec))
        del ref
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1]))
