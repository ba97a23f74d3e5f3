"""Log-likelihoods of continuations given contexts, batched, with shared contexts and prefixes
computed once (``loglikelihood``). See the package docstring.

The contexts form a prefix tree: each distinct context is a node, and so is every prefix of at
least ``min_shared`` tokens at which contexts diverge. Contexts are processed in sorted order, in
batches; a batch first prefills the tree nodes above it that are not ready (one level per batched
call, from the parents' states), then its own contexts from their parents' states, in lockstep
(``_prefill_rows``). A node's state is kept only while contexts below it are still to come, so
memory stays bounded by the batch and the tree's depth, not by the number of pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..state import State
from .tokens import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_TOKENS,
    DEFAULT_CHUNK_LEN,
    DEFAULT_MIN_SHARED,
    TopN,
    _check_start,
    _device,
    _top_lists,
    check_tokens,
    score_logits,
    token_logprobs,
)

Pair = tuple[Sequence[int], Sequence[int]]


@dataclass
class ContinuationScore:
    """``loglikelihood``'s result for one (context, continuation) pair."""

    logprob: float  # summed log-probability of the continuation given the context
    greedy: bool  # every continuation token is the argmax given what precedes it
    token_logprobs: list[float]
    top: list[TopN] | None = None  # with top_n > 0: the alternatives at each continuation position


# ---- continuations given contexts ------------------------------------------------------------------
@dataclass(eq=False)
class _Node:
    """A context (or a prefix shared by several contexts) in the prefix tree."""

    key: tuple[int, ...]
    parent: _Node | None = None
    is_context: bool = False
    refs: int = 0  # contexts below (or at) this node not yet scored
    state: State | None = None  # batch-1 state after ``key``, while still needed


def _prefix_tree(contexts: list[tuple[int, ...]], min_shared: int) -> list[_Node]:
    """Nodes for the (sorted, unique) contexts and for every prefix of >= ``min_shared`` tokens at
    which sorted neighbours diverge (the branch points of their trie); each node's parent is its
    longest proper prefix among the nodes. Returns the context nodes, in the order of ``contexts``."""
    keys = {c: True for c in contexts}
    if min_shared > 0:
        for a, b in zip(contexts, contexts[1:]):
            n = 0
            for x, y in zip(a, b):
                if x != y:
                    break
                n += 1
            if n >= min_shared:
                keys.setdefault(a[:n], False)
    nodes: dict[tuple[int, ...], _Node] = {}
    stack: list[_Node] = []
    for key in sorted(keys):  # a prefix sorts before its extensions
        while stack and key[: len(stack[-1].key)] != stack[-1].key:
            stack.pop()
        node = _Node(key, stack[-1] if stack else None, keys[key])
        nodes[key] = node
        stack.append(node)
    out = [nodes[c] for c in contexts]
    for node in out:
        p: _Node | None = node
        while p is not None:
            p.refs += 1
            p = p.parent
    return out


def _prefill_rows(
    model: torch.nn.Module, segments: list[list[int]], start: State, chunk_len: int
) -> tuple[torch.Tensor, list[State]]:
    """Prefill several non-empty sequences of different lengths from the rows of ``start``, in
    lockstep: every call feeds the same number of tokens to the rows still running (the shortest
    remainder, at most ``chunk_len``), and rows leave as they end. Returns (last logits [B, V], one
    state per row)."""
    dev = _device(model)
    states: list[State | None] = [None] * len(segments)
    last = torch.empty(len(segments), model.config.vocab_size, device=dev)
    active, st, pos = list(range(len(segments))), start, 0
    while active:
        step = min(chunk_len, min(len(segments[i]) - pos for i in active))
        x = torch.tensor([segments[i][pos : pos + step] for i in active], dtype=torch.long, device=dev)
        out, st = model(x, st, last_only=True)
        pos += step
        keep = []
        for j, i in enumerate(active):
            if len(segments[i]) == pos:
                last[i] = out[j, -1]
                states[i] = st.select(j)
            else:
                keep.append(j)
        if len(keep) < len(active):
            active = [active[j] for j in keep]
            if keep:
                st = st.select(keep)
    return last, states  # type: ignore[return-value]


class _Scorer:
    """The state of one ``loglikelihood`` call: the tree, the results, the batching limits."""

    def __init__(self, model, pairs, state, logits, batch_size, batch_tokens, chunk_len, top_n):
        self.model, self.pairs = model, pairs
        self.batch_size, self.batch_tokens, self.chunk_len, self.top_n = (
            batch_size, batch_tokens, chunk_len, top_n,
        )  # fmt: skip
        self.root_state = state if state is not None else model.init_state(1)
        self.root_logits = logits
        self.results: list[ContinuationScore | None] = [None] * len(pairs)

    def node_states(self, nodes: list[_Node]) -> tuple[torch.Tensor, list[State]]:
        """States (and last logits [len(nodes), V]) after each node's key, from its parent's state;
        parents that are not ready are computed first (one level of the tree per batched prefill).
        A node's state is kept on it while contexts below it still need it."""
        missing: list[_Node] = []
        for n in nodes:
            p = n.parent
            if p is not None and p.state is None and p not in missing:
                missing.append(p)
        done: dict[int, tuple[torch.Tensor, State]] = {}
        if missing:
            last_m, states_m = self.node_states(missing)
            done = {id(p): (last_m[k], states_m[k]) for k, p in enumerate(missing)}
        todo = [n for n in nodes if id(n) not in done]
        if todo:
            starts = [n.parent.state if n.parent is not None else self.root_state for n in todo]
            segs = [list(n.key[len(n.parent.key) if n.parent is not None else 0 :]) for n in todo]
            last_t, states_t = _prefill_rows(self.model, segs, State.stack(starts), self.chunk_len)  # type: ignore[arg-type]
            done.update({id(n): (last_t[k], states_t[k]) for k, n in enumerate(todo)})
        last = torch.stack([done[id(n)][0] for n in nodes])
        states = [done[id(n)][1] for n in nodes]
        for n, s in zip(nodes, states):
            if n.state is None and n.refs > int(n.is_context):  # contexts below it are still to come
                n.state = s
        return last, states

    def release(self, node: _Node) -> None:
        p: _Node | None = node
        while p is not None:
            p.refs -= 1
            if p.refs == 0:
                p.state = None
            p = p.parent

    def score_first(self, idx: list[int], last: torch.Tensor, row_of: list[int]) -> list[tuple]:
        """Each pair's first continuation token, from its context's last logits [Bc, V]."""
        tgt = torch.tensor([self.pairs[i][1][0] for i in idx], dtype=torch.long)
        lp, g, t = score_logits(last, tgt, torch.tensor(row_of, dtype=torch.long), self.top_n)
        tops = _top_lists(t)
        return [(lp[j].item(), bool(g[j]), tops[j] if tops else None) for j in range(len(idx))]

    def score_rest(self, idx: list[int], states: list[State]) -> dict[int, tuple]:
        """The other continuation tokens: ``cont[:-1]`` fed from each pair's context state, right-padded
        rows in batches of at most ``batch_tokens`` positions and ``4 * batch_size`` rows."""
        out: dict[int, tuple] = {}
        todo = sorted((j for j in range(len(idx)) if len(self.pairs[idx[j]][1]) > 1),
                      key=lambda j: len(self.pairs[idx[j]][1]))  # fmt: skip
        dev = _device(self.model)
        while todo and len(self.pairs[idx[todo[-1]]][1]) - 1 > self.batch_tokens:
            j = todo.pop()  # longer than one call may hold: streamed alone, chunk by chunk
            r = token_logprobs(self.model, self.pairs[idx[j]][1], states[j], top_n=self.top_n,
                               chunk_len=self.batch_tokens)  # fmt: skip
            out[j] = (r.logprobs[1:], all(r.greedy[1:]), r.top[1:] if r.top is not None else None)
        while todo:
            T = len(self.pairs[idx[todo[0]]][1]) - 1
            take = 1
            while take < min(len(todo), 4 * self.batch_size):  # rows hold a state each: bounded too
                T2 = len(self.pairs[idx[todo[take]]][1]) - 1
                if (take + 1) * T2 > self.batch_tokens:
                    break
                take, T = take + 1, T2
            group, todo = todo[:take], todo[take:]
            conts = [list(self.pairs[idx[j]][1]) for j in group]
            x = torch.tensor([c[:-1] + [0] * (T + 1 - len(c)) for c in conts], dtype=torch.long, device=dev)
            logits, _ = self.model(x, State.stack([states[j] for j in group]))  # [R, T, V]
            rows = [r * T + t for r, c in enumerate(conts) for t in range(len(c) - 1)]
            tgt = [tok for c in conts for tok in c[1:]]
            lp, g, tp = score_logits(logits, torch.tensor(tgt), torch.tensor(rows), self.top_n)
            tops = _top_lists(tp)
            k = 0
            for j, c in zip(group, conts):
                n = len(c) - 1
                out[j] = (lp[k : k + n].tolist(), bool(g[k : k + n].all()), tops[k : k + n] if tops else None)
                k += n
        return out

    def run_batch(self, ctx_nodes: list[_Node], pair_idx: list[list[int]]) -> None:
        if ctx_nodes[0].key == () and len(ctx_nodes) == 1:  # empty context: the given state and logits
            assert self.root_logits is not None
            last, states = self.root_logits.reshape(1, -1).clone(), [self.root_state]
        else:
            last, states = self.node_states(ctx_nodes)
        idx = [i for group in pair_idx for i in group]
        row_of = [r for r, group in enumerate(pair_idx) for _ in group]
        first = self.score_first(idx, last, row_of)
        rest = self.score_rest(idx, [states[r] for r in row_of])
        for j, i in enumerate(idx):
            lp0, g0, t0 = first[j]
            lps, gs, ts = rest.get(j, ([], True, []))
            self.results[i] = ContinuationScore(
                logprob=float(sum([lp0, *lps])), greedy=g0 and gs, token_logprobs=[lp0, *lps],
                top=[t0, *ts] if t0 is not None else None,
            )  # fmt: skip
        for n in ctx_nodes:
            self.release(n)


@torch.no_grad()
def loglikelihood(
    model: torch.nn.Module,
    pairs: Sequence[Pair],
    state: State | None = None,
    logits: torch.Tensor | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    min_shared: int = DEFAULT_MIN_SHARED,
    top_n: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[ContinuationScore]:
    """Score each continuation given its context: ``pairs`` are (context ids, continuation ids).

    Every context starts from ``state`` (default: the model's initial state). A context may be
    empty only when ``logits`` (the next-token logits that go with ``state``) are given. Up to
    ``batch_size`` distinct contexts are prefilled together; prefixes of >= ``min_shared`` tokens
    shared by several contexts are prefilled once (0: only identical contexts are shared); each
    model call on continuations covers at most ``batch_tokens`` positions and ``4 * batch_size``
    rows. ``top_n`` > 0 adds the most probable alternatives at every continuation position.
    ``progress(done, total)`` is called after each batch of contexts. Results are in the order
    of ``pairs``.
    """
    if batch_size <= 0 or batch_tokens <= 0 or chunk_len <= 0:
        raise ValueError("batch_size, batch_tokens and chunk_len must be positive")
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    _check_start(model, state, logits)
    V = model.config.vocab_size
    clean: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for i, (ctx, cont) in enumerate(pairs):
        c = tuple(check_tokens(ctx, V, f"pair {i}'s context"))
        k = tuple(check_tokens(cont, V, f"pair {i}'s continuation"))
        if not k:
            raise ValueError(f"pair {i} has an empty continuation: there is nothing to score")
        if not c and logits is None:
            raise ValueError(
                f"pair {i} has an empty context: its first token has nothing to be conditioned on; "
                "start the context with a token (0, end of document, is what RWKV models see before a "
                "document) or pass the state and logits to continue from"
            )
        clean.append((c, k))
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for i, (c, _) in enumerate(clean):
        by_ctx.setdefault(c, []).append(i)
    contexts = sorted(by_ctx)  # neighbours share prefixes: batches reuse the same branch states
    scorer = _Scorer(model, clean, state, logits, batch_size, batch_tokens, chunk_len, top_n)
    nodes = _prefix_tree([c for c in contexts if c], min_shared)
    node_of = dict(zip([c for c in contexts if c], nodes))
    done = 0
    if () in by_ctx:
        scorer.run_batch([_Node((), None, True, 1)], [by_ctx[()]])
        done += len(by_ctx[()])
        if progress is not None:
            progress(done, len(clean))
    rest = [c for c in contexts if c]
    for b in range(0, len(rest), batch_size):
        batch = rest[b : b + batch_size]
        # similar lengths together: fewer lockstep calls with few rows
        batch.sort(key=lambda c: len(c) - len(node_of[c].parent.key) if node_of[c].parent else len(c))
        scorer.run_batch([node_of[c] for c in batch], [by_ctx[c] for c in batch])
        done += sum(len(by_ctx[c]) for c in batch)
        if progress is not None:
            progress(done, len(clean))
    return scorer.results  # type: ignore[return-value]
