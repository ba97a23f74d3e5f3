"""Log-probabilities of the tokens of one sequence: ``score_logits`` (from logits in hand),
``token_logprobs`` (every token, optional top-N) and ``rolling_loglikelihood`` (a document of any
length, streamed chunk by chunk through the recurrent state). See the package docstring.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..state import State

DEFAULT_CHUNK_LEN = 512  # positions per call for one sequence (logits: 128 MiB at V = 65536)
DEFAULT_BATCH_TOKENS = 1024  # positions per call for a batch of continuations
DEFAULT_BATCH_SIZE = 16  # contexts prefilled together
DEFAULT_MIN_SHARED = 16  # shorter prefixes shared by different contexts are recomputed

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


def token_id(t: object, what: str) -> int:
    """``t`` as a token id: an integer (int, NumPy or one-element torch integer), never a float that
    ``int()`` would quietly truncate; a ValueError names the first bad one."""
    try:
        return operator.index(t)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what}: token ids must be integers, got {t!r}") from None


def check_tokens(tokens: Sequence[int], vocab_size: int, what: str = "prompt") -> list[int]:
    """``tokens`` as a list of ids in ``[0, vocab_size)``; a ValueError names what is wrong."""
    out = [token_id(t, what) for t in tokens]
    bad = [t for t in out if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{what} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return out


def _chunks(tokens: Iterable[int], n: int) -> Iterable[list[int]]:
    buf: list[int] = []
    for t in tokens:
        buf.append(token_id(t, "the sequence"))
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
        check_tokens(chunk, V, "the sequence")
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
    tokens = [token_id(t, "the sequence") for t in tokens]
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
