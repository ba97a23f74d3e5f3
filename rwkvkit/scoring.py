"""Scoring text with an RWKV model: log-probabilities of tokens, continuations and whole documents.

Three public functions over token ids (no tokenizer here; ``rwkvkit.eval`` and the server add text):

- ``token_logprobs``: every token's log-probability given the ones before it (optionally the
  top-N alternatives at each position), from the model's initial state or a given ``State``.
  The first token has no log-probability unless the next-token ``logits`` that go with the
  starting state are given (what ``generate.prefill`` returns).
- ``loglikelihood``: for many (context, continuation) pairs, the summed log-probability of the
  continuation and whether it is the greedy one. Contexts are prefilled once however many pairs
  share them (lm-eval's multiple choice), and contexts that share a long prefix prefill it once
  (a prefix tree over the contexts); the continuations then run as a batch from the stacked
  context states, right-padded (in an RNN, padding after a row's last scored token cannot affect
  it). Results come back in input order.
- ``rolling_loglikelihood``: a document of any length streamed through the recurrent state in
  chunks: memory does not grow with the document, and nothing is truncated (every token is
  conditioned on everything before it, which a windowed Transformer evaluation cannot do).

Logits [B, T, V] fp32 are the big tensor here (V = 65536: 256 KiB per position), so each model
call is bounded in positions (``batch_tokens``, ``chunk_len``) and its log-softmax is computed in
place: gather the scored logits, argmax and top-N first, then a log-sum-exp that reuses the
logits' memory. Sums are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .state import State

DEFAULT_CHUNK_LEN = 512  # positions per call for one sequence (logits: 128 MiB at V = 65536)
DEFAULT_BATCH_TOKENS = 1024  # positions per call for a batch of continuations
DEFAULT_BATCH_SIZE = 16  # contexts prefilled together
DEFAULT_MIN_SHARED = 16  # shorter prefixes shared by different contexts are recomputed

Pair = tuple[Sequence[int], Sequence[int]]
TopN = list[tuple[int, float]]


@dataclass
class TokenScores:
    """``token_logprobs``'s result: one entry per input token (None where a token has no context)."""

    tokens: list[int]
    logprobs: list[float | None]
    greedy: list[bool | None]  # whether each token is the argmax of its distribution
    top: list[TopN | None] | None  # top-N (token, logprob) per position, most probable first
    state: State  # after the last token: pass it on to continue
    logits: torch.Tensor  # [V] fp32 next-token logits after the last token (they go with ``state``)

    @property
    def total(self) -> float:
        """Summed log-probability of the tokens that have one."""
        return sum(lp for lp in self.logprobs if lp is not None)


@dataclass
class ContinuationScore:
    """``loglikelihood``'s result for one (context, continuation) pair."""

    logprob: float  # summed log-probability of the continuation given the context
    greedy: bool  # every continuation token is the argmax given what precedes it
    token_logprobs: list[float]
    top: list[TopN] | None = None  # with top_n > 0: the alternatives at each continuation position


@dataclass
class RollingScore:
    """``rolling_loglikelihood``'s result."""

    logprob: float  # summed log-probability of the scored tokens (natural log)
    tokens: int  # tokens scored (all of them when ``logits`` were given, else all but the first)
    greedy: int  # how many of them were the argmax
    state: State | None  # after the whole document (None for an empty one without a starting state)
    logits: torch.Tensor | None  # [V] next-token logits after the document

    @property
    def nll_per_token(self) -> float:
        return -self.logprob / self.tokens if self.tokens else float("nan")


# ---- log-probabilities from logits ---------------------------------------------------------------
def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim of a 2-D fp32 tensor, overwriting ``x`` (no second [N, V] buffer)."""
    m = x.amax(-1, keepdim=True)
    x.sub_(m).exp_()
    return m.squeeze(-1) + x.sum(-1).log()


def score_logits(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None, top_n: int = 0
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Log-probabilities of ``targets`` under ``logits`` [N, V] (row ``rows[i]`` scores ``targets[i]``;
    ``rows`` defaults to 0..N-1). Returns (logprobs [M] fp32, greedy [M] bool, top) where top is
    (logprobs [M, k], ids [M, k]) of the ``top_n`` most probable tokens, or None.

    OVERWRITES ``logits`` (its memory holds the softmax numerators afterwards): pass a copy to keep them.
    """
    x = logits.reshape(-1, logits.shape[-1])
    if x.dtype != torch.float32:
        x = x.float()
    if rows is None:
        rows = torch.arange(x.shape[0], device=x.device)
    rows, targets = rows.to(x.device), targets.to(x.device)
    picked = x[rows, targets]
    greedy = x.argmax(-1)[rows] == targets
    top = None
    if top_n > 0:
        tv, ti = x.topk(min(top_n, x.shape[-1]), dim=-1)
    lse = _logsumexp_(x)
    if top_n > 0:
        top = ((tv - lse[:, None])[rows], ti[rows])
    return picked - lse[rows], greedy, top


def _top_lists(top: tuple[torch.Tensor, torch.Tensor] | None) -> list[TopN] | None:
    if top is None:
        return None
    vals, ids = top[0].tolist(), top[1].tolist()
    return [list(zip(i, v)) for i, v in zip(ids, vals)]


# ---- token log-probabilities and rolling log-likelihood ------------------------------------------
def _device(model: torch.nn.Module) -> torch.device:
    return model.emb.weight.device


def _check_start(model: torch.nn.Module, state: State | None, logits: torch.Tensor | None) -> None:
    if logits is not None and state is None:
        raise ValueError("logits were given without the state they came from (pass both, or neither)")
    if state is not None:
        state.check(model.config, batch_size=1)
    if logits is not None and logits.numel() != model.config.vocab_size:
        raise ValueError(
            f"logits have {logits.numel()} entries, the model's vocabulary {model.config.vocab_size}"
        )


def _check_ids(tokens: Sequence[int], vocab_size: int, what: str) -> list[int]:
    out = [int(t) for t in tokens]
    bad = [t for t in out if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return out


def _chunks(tokens: Iterable[int], n: int) -> Iterable[list[int]]:
    buf: list[int] = []
    for t in tokens:
        buf.append(int(t))
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _stream(
    model: torch.nn.Module,
    tokens: Iterable[int],
    state: State | None,
    logits: torch.Tensor | None,
    chunk_len: int,
    top_n: int,
    on_chunk: Callable[[list[int], torch.Tensor, torch.Tensor, object], None],
) -> tuple[State | None, torch.Tensor | None]:
    """Feed ``tokens`` chunk by chunk; call ``on_chunk(chunk, logprobs, greedy, top)`` with the scores
    of the chunk's tokens that have a context (all but the very first token when ``logits`` is None)."""
    if chunk_len <= 0:
        raise ValueError(f"chunk_len must be positive, got {chunk_len}")
    _check_start(model, state, logits)
    V, dev = model.config.vocab_size, _device(model)
    prev = None if logits is None else logits.reshape(1, V).to(dev, torch.float32, copy=True)
    for chunk in _chunks(tokens, chunk_len):
        _check_ids(chunk, V, "the sequence")
        x = torch.tensor([chunk], dtype=torch.long, device=dev)
        out, state = model(x, state)  # [1, T, V]
        out = out[0]
        last = out[-1:].clone()  # scores the next chunk's first token (scoring below overwrites out)
        tgt = x[0]
        if prev is not None:  # the chunk's first token, from the previous chunk's last position
            lp0, g0, t0 = score_logits(prev, tgt[:1], top_n=top_n)
        if len(chunk) > 1:
            lp, g, t = score_logits(out[:-1], tgt[1:], top_n=top_n)
            if prev is not None:
                lp, g = torch.cat([lp0, lp]), torch.cat([g0, g])
                t = None if t is None else (torch.cat([t0[0], t[0]]), torch.cat([t0[1], t[1]]))
        elif prev is not None:
            lp, g, t = lp0, g0, t0
        else:
            lp, g, t = out.new_zeros(0), torch.zeros(0, dtype=torch.bool), None
        on_chunk(chunk, lp, g, t)
        prev = last
    return state, None if prev is None else prev[0]


@torch.no_grad()
def token_logprobs(
    model: torch.nn.Module,
    tokens: Sequence[int],
    state: State | None = None,
    logits: torch.Tensor | None = None,
    *,
    top_n: int = 0,
    chunk_len: int = DEFAULT_CHUNK_LEN,
) -> TokenScores:
    """Each token's log-probability given the tokens before it (and ``state``, default the model's
    initial state). ``logits`` [V]: the next-token logits that go with ``state`` (as ``prefill``
    returns them); without them the first token has no log-probability (None). ``top_n`` > 0 also
    returns the ``top_n`` most probable (token, logprob) at every scored position."""
    tokens = list(tokens)
    if not tokens:
        raise ValueError("token_logprobs needs at least one token")
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    lps: list[float | None] = [] if logits is not None else [None]
    greedy: list[bool | None] = [] if logits is not None else [None]
    top: list[TopN | None] | None = None if not top_n else ([] if logits is not None else [None])

    def collect(chunk: list[int], lp: torch.Tensor, g: torch.Tensor, t: object) -> None:
        lps.extend(lp.tolist())
        greedy.extend(g.tolist())
        if top is not None:
            top.extend(_top_lists(t) or [])  # type: ignore[arg-type]

    end_state, end_logits = _stream(model, tokens, state, logits, chunk_len, top_n, collect)
    assert end_state is not None and end_logits is not None
    return TokenScores(tokens, lps, greedy, top, end_state, end_logits)


@torch.no_grad()
def rolling_loglikelihood(
    model: torch.nn.Module,
    tokens: Iterable[int],
    state: State | None = None,
    logits: torch.Tensor | None = None,
    *,
    chunk_len: int = DEFAULT_CHUNK_LEN,
    progress: Callable[[int], None] | None = None,
) -> RollingScore:
    """Summed log-probability of a document of any length, streamed through the recurrent state.

    ``tokens`` may be any iterable (a generator reading a file keeps memory independent of the
    document's length). With ``logits`` (and their ``state``) every token is scored; without them
    the first token only conditions the rest. ``progress(n)`` is called after each chunk with the
    number of tokens fed so far.
    """
    total = [0.0, 0, 0, 0]  # logprob, scored, greedy, fed

    def add(chunk: list[int], lp: torch.Tensor, g: torch.Tensor, t: object) -> None:
        total[0] += float(lp.double().sum())
        total[1] += lp.numel()
        total[2] += int(g.sum())
        total[3] += len(chunk)
        if progress is not None:
            progress(int(total[3]))

    end_state, end_logits = _stream(model, tokens, state, logits, chunk_len, 0, add)
    return RollingScore(total[0], int(total[1]), int(total[2]), end_state, end_logits)


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
        rows in batches of at most ``batch_tokens`` positions."""
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
            while take < len(todo):
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
    model call on continuations covers at most ``batch_tokens`` positions. ``progress(done, total)``
    is called after each batch of contexts. Results are in the order of ``pairs``.
    """
    if batch_size <= 0 or batch_tokens <= 0 or chunk_len <= 0:
        raise ValueError("batch_size, batch_tokens and chunk_len must be positive")
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    _check_start(model, state, logits)
    V = model.config.vocab_size
    clean: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for i, (ctx, cont) in enumerate(pairs):
        c = tuple(_check_ids(ctx, V, f"pair {i}'s context"))
        k = tuple(_check_ids(cont, V, f"pair {i}'s continuation"))
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
