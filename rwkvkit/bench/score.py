"""``rwkvkit bench score``: scoring throughput, batched vs one pair at a time, against the reference.

One run, one random Finch of the 0.1B shape (L12, D768, V65536, bf16 file like the released ones),
and lm-eval-like requests: multiple-choice questions (4 choices by default) with contexts of
100..300 tokens and continuations of 5..20 tokens. Every row scores the same (context,
continuation) pairs (summed log-probability and greedy flag of each continuation):

- ``rwkv 0.8.32``: the reference package ('cpu fp32', JIT on as it ships) the way its users score a
  pair: ``forward(context + continuation, full_output=True)``, log-softmax, gather; and the same
  with each question's context run once and its state copied for every choice;
- ``rwkvkit, whole sequence per pair``: the same work as the reference's first row, on rwkvkit;
- ``rwkvkit one at a time``: ``scoring.loglikelihood`` on one pair per call (the context prefilled
  without the head's logits, the continuation with them);
- ``rwkvkit batched``: ``scoring.loglikelihood`` on all pairs: each context once, contexts
  prefilled together, continuations as a batch from the stacked states (fp32 and bf16).

tokens/s counts the tokens of every pair (context + continuation), however many are computed.
Machines here are shared and noisy: read the ratios, which come from one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable

import torch

from ..cli_args import csv_list, non_negative_int, positive_int
from ..testing import random_checkpoint

Pair = tuple[list[int], list[int]]


def make_pairs(
    n_questions: int, n_choices: int, ctx: tuple[int, int], cont: tuple[int, int], vocab: int, seed: int = 0
) -> list[Pair]:
    """Random multiple-choice requests: each question's context is shared by its choices."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    pairs = []
    for _ in range(n_questions):
        c = ids(*ctx)
        pairs += [(c, ids(*cont)) for _ in range(n_choices)]
    return pairs


def _score_whole(logits: torch.Tensor, n_ctx: int, cont: list[int]) -> tuple[float, bool]:
    """(summed logprob, greedy) of ``cont`` from logits [T, V] of context + continuation."""
    lp = torch.log_softmax(logits.float()[n_ctx - 1 : n_ctx - 1 + len(cont)], -1)
    tgt = torch.tensor(cont)
    return float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())


def reference_whole(ref, pairs: list[Pair]) -> list[tuple[float, bool]]:
    out = []
    for ctx, cont in pairs:
        logits, _ = ref.forward(ctx + cont, None, full_output=True)
        out.append(_score_whole(logits, len(ctx), cont))
    return out


def reference_shared(ref, pairs: list[Pair]) -> list[tuple[float, bool]]:
    """The context once per question, its state copied for each choice (the reference's forward
    updates the state it is given)."""
    out, last_ctx, state, ctx_logits = [], None, None, None
    for ctx, cont in pairs:
        if ctx is not last_ctx:
            ctx_logits, state = ref.forward(ctx, None)
            last_ctx = ctx
        logits, _ = ref.forward(cont, [s.clone() for s in state], full_output=True)
        logits = torch.cat([ctx_logits.float().reshape(1, -1), logits.float()])
        out.append(_score_whole(logits, 1, cont))
    return out


def rwkvkit_whole(model, pairs: list[Pair]) -> list[tuple[float, bool]]:
    out = []
    for ctx, cont in pairs:
        logits, _ = model(ctx + cont)
        out.append(_score_whole(logits[0], len(ctx), cont))
    return out


def _time(fn: Callable[[], object], warm: Callable[[], object], repeat: int) -> tuple[float, object]:
    warm()
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _range(value: str) -> tuple[int, int]:
    """``min,max``: two positive token counts, min <= max."""
    parts = csv_list(value)
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"needs min,max (two numbers), got {value!r}")
    lo, hi = (positive_int(v) for v in parts)
    if lo > hi:
        raise argparse.ArgumentTypeError(f"min {lo} is above max {hi}")
    return lo, hi


_range.__name__ = "range"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rwkvkit bench score", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=positive_int, default=12)
    p.add_argument("--embd", type=positive_int, default=768)
    p.add_argument("--vocab", type=positive_int, default=65536)
    p.add_argument("--questions", type=positive_int, default=16)
    p.add_argument("--choices", type=positive_int, default=4)
    p.add_argument(
        "--ctx", type=_range, default="100,300", help="context length range, min,max tokens (min >= 1)"
    )
    p.add_argument(
        "--cont", type=_range, default="5,20", help="continuation length range, min,max tokens (min >= 1)"
    )
    p.add_argument("--batch-size", type=positive_int, default=16, help="contexts prefilled together")
    p.add_argument("--repeat", type=positive_int, default=1, help="timed passes per row, best kept")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--no-reference", action="store_true", help="skip the rwkv package")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx, cont = args.ctx, args.cont

    import rwkvkit
    from rwkvkit import scoring

    tmp = tempfile.mkdtemp(prefix="rwkvkit-bench-")
    path = os.path.join(tmp, "RWKV-x060-random-0B1.pth")
    random_checkpoint(
        6, args.layers, args.embd, args.vocab, head_size=64, dtype=torch.bfloat16, seed=0, path=path
    )
    pairs = make_pairs(args.questions, args.choices, ctx, cont, args.vocab)  # type: ignore[arg-type]
    n_tok = sum(len(c) + len(k) for c, k in pairs)
    n_cont = sum(len(k) for _, k in pairs)
    print(
        f"Finch L{args.layers} D{args.embd} V{args.vocab}, torch {torch.__version__}, threads {torch.get_num_threads()}\n"
        f"{args.questions} questions x {args.choices} choices = {len(pairs)} pairs, contexts {ctx[0]}..{ctx[1]} "
        f"tokens, continuations {cont[0]}..{cont[1]}: {n_tok} tokens, {n_cont} scored"
    )
    rows: list[tuple[str, float, list[tuple[float, bool]]]] = []

    if not args.no_reference:
        os.environ["RWKV_JIT_ON"] = "1"  # as the package ships (it turns the JIT on unless told '0')
        os.environ["RWKV_CUDA_ON"] = "0"
        try:
            from rwkv.model import RWKV as RefRWKV
        except ImportError:
            print("reference: the rwkv package is not installed (pip install rwkv==0.8.32)")
            RefRWKV = None
        if RefRWKV is not None:
            ref = RefRWKV(model=path[:-4], strategy="cpu fp32", verbose=False)
            with torch.no_grad():
                for name, fn in [("rwkv 0.8.32, whole sequence per pair", reference_whole),
                                 ("rwkv 0.8.32, context once per question", reference_shared)]:  # fmt: skip
                    t, res = _time(
                        lambda fn=fn: fn(ref, pairs), lambda fn=fn: fn(ref, pairs[:2]), args.repeat
                    )
                    rows.append((name, t, res))  # type: ignore[arg-type]
            del ref

    for dtype in (torch.float32, torch.bfloat16):
        dt = "fp32" if dtype == torch.float32 else "bf16"
        model = rwkvkit.load(path, dtype=dtype)
        with torch.no_grad():
            runs: list[tuple[str, Callable[[list[Pair]], list]]] = [
                ("whole sequence per pair", lambda ps, m=model: rwkvkit_whole(m, ps)),
                ("one pair at a time", lambda ps, m=model: [scoring.loglikelihood(m, [q])[0] for q in ps]),
                (f"batched (batch {args.batch_size})", lambda ps, m=model: scoring.loglikelihood(m, ps, batch_size=args.batch_size)),
            ]  # fmt: skip
            if dtype == torch.bfloat16:
                runs = runs[1:]
            for name, fn in runs:
                t, res = _time(lambda fn=fn: fn(pairs), lambda fn=fn: fn(pairs[: args.choices]), args.repeat)
                res = [(s.logprob, s.greedy) if isinstance(s, scoring.ContinuationScore) else s for s in res]  # type: ignore[union-attr]
                rows.append((f"rwkvkit {dt}, {name}", t, res))
        del model

    base = rows[0][2]
    base_name = rows[0][0]
    print(f"\n{'':48} {'pairs/s':>8} {'tokens/s':>9} {'x first':>8}  max |logprob diff| vs {base_name}")
    for name, t, res in rows:
        diff = max(abs(a[0] - b[0]) for a, b in zip(res, base))
        flips = sum(a[1] != b[1] for a, b in zip(res, base))
        print(
            f"{name:48} {len(pairs) / t:8.1f} {n_tok / t:9.0f} {rows[0][1] / t:8.2f}  {diff:.1e}"
            + (f" ({flips} greedy flags differ)" if flips else "")
        )
    kit = {name: t for name, t, _ in rows}
    one, batched = (
        kit["rwkvkit fp32, one pair at a time"],
        kit[f"rwkvkit fp32, batched (batch {args.batch_size})"],
    )
    print(f"\nrwkvkit fp32: batched = {one / batched:.2f}x one pair at a time")
    if not args.no_reference and "rwkv 0.8.32, whole sequence per pair" in kit:
        r1 = kit["rwkv 0.8.32, whole sequence per pair"]
        r2 = kit["rwkv 0.8.32, context once per question"]
        print(
            f"rwkvkit fp32 batched = {r1 / batched:.2f}x the reference per pair, {r2 / batched:.2f}x the reference with shared contexts"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
