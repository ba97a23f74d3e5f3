"""Sampling as RWKV users know it: small pure functions on one row of logits, and their composition.

The semantics follow ``rwkv.utils.PIPELINE`` (the reference ChatRWKV pipeline), step by step:

1. banned tokens get ``-inf``;
2. every token seen so far loses ``presence + count * frequency`` from its logit, where ``count`` is
   a per-token weight sum that decays by ``alpha_decay`` each generated token (``penalize``/``Penalty``);
3. softmax; top-p keeps every token whose probability is at least the probability at which the
   sorted cumulative sum first reaches ``top_p``; top-k keeps the ``top_k`` most probable;
4. temperature divides the kept tokens' log-probabilities (the reference raises the kept
   probabilities to ``1 / temperature``: the same distribution);
5. one token is drawn with a seeded ``torch.Generator``.

Steps 3-4 work in log space: top-p and top-k are boolean masks (on log-probabilities in the
``*_filter`` functions, which set ``-inf``), and temperature scales ``logits - max(logits)`` (equal to
``logp - max(logp)``) by ``1 / T`` before the one exponentiation. The most probable kept token always
has weight ``exp(0) = 1``, so no temperature in ``(0, 100]`` underflows every weight to zero (the
reference's ``probs ** (1/T)`` does below T ~ 0.05, then divides 0 by 0), and the distribution tends
to the greedy choice as ``T -> 0``. NaN logits count as ``-inf`` and ``+inf`` logits share all the
mass, so no input yields a NaN probability.

``temperature == 0`` means greedy: the argmax of the penalised logits (the reference does the same
through ``top_p = 0``). One deliberate deviation: ``top_p >= 1`` keeps every token (the reference's
float cumsum can fall short of 1.0 and then silently turns sampling greedy).

The pure functions work on a 1-D ``[V]`` tensor for one sequence. ``sample_rows`` draws for a batch
``[B, V]`` of rows, each with its own ``Sampler`` (parameters, penalty counts, generator): penalties
and bans are applied per row (to the few tokens they touch), then the rows that share temperature,
top-p and top-k are filtered, exponentiated and drawn together (``rwkvkit.sampling_group``): by the C
kernel of ``ops.sample_native`` when it is built (the exact top-p cutoff without sorting the nucleus,
rows on OpenMP threads), else with one tensor operation per step over the whole group. Each row gets exactly
the token it would get alone: the same operations on the same values, and one draw from its own
generator; ``sample_logits`` and ``Sampler`` draw through the same path (the C kernel's exp can
differ from ``torch.exp``, which ``sampling_weights`` uses, by an ulp). ``Sampler.__call__`` is
``sample_rows`` on one row.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .sampling_group import _INV_T_MAX, draw_group, top_p_cutoffs
from .sampling_group import top_p_cutoff as top_p_cutoff  # re-exported: the reference's cutoff of one row

SEED_RANGE = 1 << 64  # torch generators take seeds in [0, 2**64)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings; defaults are the reference PIPELINE_ARGS defaults."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 0.85  # nucleus mass kept, in [0, 1]; 0 keeps only the most probable token
    top_k: int = 0  # keep only the k most probable tokens; 0 = off
    presence_penalty: float = 0.2  # subtracted once from every token already generated
    frequency_penalty: float = 0.2  # subtracted per (decayed) occurrence
    penalty_decay: float = 0.996  # occurrence counts are multiplied by this after every token
    token_ban: tuple[int, ...] = ()  # tokens that are never produced
    seed: int | None = None  # a fixed seed makes the output reproducible

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "penalty_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"{name} must be a number, got {v!r}")
        for name in ("top_k", "seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise ValueError(f"{name} must be an integer, got {v!r}")
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (0.0 <= self.top_p <= 1.0):
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p!r}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (0.0 <= self.penalty_decay <= 1.0):
            raise ValueError(f"penalty_decay must be in [0, 1], got {self.penalty_decay!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-100.0 <= v <= 100.0):
                raise ValueError(f"{name} must be in [-100, 100], got {v!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or int(self.seed) != self.seed
            or not -SEED_RANGE < self.seed < SEED_RANGE
        ):
            raise ValueError(f"seed must be an integer in (-2**64, 2**64), got {self.seed!r}")
        object.__setattr__(self, "token_ban", tuple(int(t) for t in self.token_ban))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)  # type: ignore[arg-type]


GREEDY = SamplingParams(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)


# ---- pure functions on one row of logits / log-probabilities ---------------------------------------
def ban_tokens(logits: torch.Tensor, token_ban: Iterable[int]) -> torch.Tensor:
    """Return ``logits`` with the banned tokens set to ``-inf``."""
    ban = list(token_ban)
    if not ban:
        return logits
    out = logits.clone()
    out[torch.as_tensor(ban, dtype=torch.long, device=logits.device)] = -float("inf")
    return out


def penalize(
    logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """``logits - presence * seen - frequency * counts`` (``seen`` bool [V], ``counts`` float [V])."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    return logits - presence * seen.to(logits.dtype) - frequency * counts.to(logits.dtype)


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 logits with NaN as ``-inf``; if any logit is ``+inf``, those tokens share all the mass.

    Raises ValueError when no token is left (every logit ``-inf`` or NaN: all banned, say).
    """
    x = logits.detach().float()
    if bool(torch.isfinite(x.max())):  # max is NaN if any entry is: one cheap reduction in the usual case
        return x
    x = torch.where(torch.isnan(x), torch.full_like(x, -float("inf")), x)
    pos = torch.isposinf(x)
    if bool(pos.any()):
        x = torch.where(pos, torch.zeros_like(x), torch.full_like(x, -float("inf")))
    if not bool(torch.isfinite(x).any()):
        raise ValueError("no token can be sampled: every logit is -inf or NaN (all tokens banned?)")
    return x


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` of one row of logits [V] in float32 (non-finite logits as in ``finite_logits``)."""
    return torch.log_softmax(finite_logits(logits), dim=-1)


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool [V]: the tokens whose probability is at least the cutoff, the probability at which the
    descending cumulative sum first reaches ``top_p`` (ties with the cutoff are kept, as in the reference).

    The sort and the float32 cumulative sum are done in NumPy, as the reference does (and ~20x
    faster than ``torch.sort`` on a 65536-entry vocabulary on CPU).
    """
    p = probs.detach().float().cpu()
    return probs >= float(top_p_cutoffs(p.reshape(1, -1).numpy(), top_p)[0])


def top_k_mask(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Bool [V]: the ``top_k`` largest entries of ``scores`` (logits, log-probs or probabilities)."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    keep[torch.topk(scores, top_k).indices] = True
    return keep


def top_p_filter(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logp`` with ``-inf`` outside the top-p nucleus (``top_p >= 1`` keeps all)."""
    if top_p >= 1.0:
        return logp
    return logp.masked_fill(~top_p_mask(torch.exp(logp.float()), top_p), -float("inf"))


def top_k_filter(logp: torch.Tensor, top_k: int) -> torch.Tensor:
    """``logp`` with ``-inf`` outside the ``top_k`` largest (0 or >= V keeps all)."""
    if top_k <= 0 or top_k >= logp.numel():
        return logp
    return logp.masked_fill(~top_k_mask(logp, top_k), -float("inf"))


def apply_temperature(logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """Normalised log-probabilities of ``softmax(logp / temperature)`` (``-inf`` entries stay out).

    ``logp - max`` (<= 0) is scaled by ``1 / temperature`` (capped at float32's largest value), so the
    best token stays at 0 for any temperature > 0 and the others go to ``-inf`` as
    ``temperature -> 0`` (greedy) instead of every weight underflowing.
    """
    z = _scaled(logp.detach().float(), temperature)
    return z - torch.logsumexp(z, dim=-1)


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(x - max(x)) / temperature`` in a new tensor (1 / temperature capped at float32's largest value)."""
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 here (0 is the greedy path), got {temperature!r}")
    y = x - x.max()
    return y if temperature == 1.0 else y.mul_(min(1.0 / temperature, _INV_T_MAX))


def sampling_weights(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Unnormalised float32 weights [V] a token is drawn from (non-greedy): ``exp((x - max) / T)`` on
    the tokens top-p and top-k keep, 0 elsewhere. The best token always has weight exactly 1."""
    x = finite_logits(logits)
    keep = None
    if params.top_p < 1.0:
        keep = top_p_mask(torch.softmax(x, dim=-1), params.top_p)
    if 0 < params.top_k < x.numel():
        k = top_k_mask(x, params.top_k)
        keep = k if keep is None else keep & k
    w = _scaled(x, params.temperature).exp_()
    return w if keep is None else w.masked_fill_(~keep, 0.0)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The float32 distribution [V] a token is drawn from, after top-p, top-k and temperature (non-greedy)."""
    w = sampling_weights(logits, params)
    return w / w.sum()


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed`` (a fresh random seed when None). The CPU generator (a Mersenne
    Twister) keeps 32 bits of it: seeds equal modulo 2**32 draw the same numbers there."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) % SEED_RANGE)  # negative seeds map into torch's range
    return g


def sample_logits(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """Draw one token from already-penalised logits [V] (bans are applied here)."""
    logits = ban_tokens(logits, params.token_ban)
    if params.greedy:
        return int(torch.argmax(finite_logits(logits)))
    x = finite_logits(logits).cpu().reshape(1, -1).contiguous()  # the batched rows' path: the same token
    return draw_group(x, params.temperature, params.top_p, params.top_k, [generator])[0]


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn with probability proportional to ``probs`` [V] (inverse CDF; never a zero entry)."""
    cdf = torch.cumsum(probs.float(), 0)
    u = torch.rand(1, generator=generator, dtype=torch.float32) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), probs.numel() - 1)


# ---- per-sequence sampler: penalty memory + generator ----------------------------------------------
@dataclass
class Sampler:
    """The sampling state of one sequence: its params, decayed occurrence counts and generator.

    ``weights`` [V] (optional) is the amount a token adds to its own count when generated; the
    reference uses 0 for tokens that decode to whitespace or digits and 1 otherwise (see
    ``rwkvkit.generation.penalty_weights``). Tokens with weight 0 still get the presence penalty.
    ``seen`` and ``counts`` are kept only when a penalty uses them (both penalties 0: they stay empty).
    """

    params: SamplingParams
    vocab_size: int
    weights: torch.Tensor | None = None
    seen: torch.Tensor = field(init=False)
    counts: torch.Tensor = field(init=False)
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        self.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
        self.counts = torch.zeros(self.vocab_size, dtype=torch.float32)
        self.generator = make_generator(self.params.seed)
        self._seen_ids: list[int] = []
        self._seen_idx: torch.Tensor | None = None  # _seen_ids as a tensor, rebuilt when a token is new
        self._penalised = bool(self.params.presence_penalty or self.params.frequency_penalty)
        self._ban = torch.tensor(self.params.token_ban, dtype=torch.long) if self.params.token_ban else None
        for t in self.params.token_ban:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token_ban contains {t}, outside the vocabulary [0, {self.vocab_size})")
        if len(set(self.params.token_ban)) >= self.vocab_size:
            raise ValueError(f"token_ban bans all {self.vocab_size} tokens: nothing could be sampled")

    def _idx(self) -> torch.Tensor:
        if self._seen_idx is None or self._seen_idx.numel() != len(self._seen_ids):
            self._seen_idx = torch.tensor(self._seen_ids, dtype=torch.long)
        return self._seen_idx

    def penalize_(self, logits: torch.Tensor) -> None:
        """Apply this sequence's penalties and bans to its row of float32 CPU logits [V], in place."""
        p = self.params
        if self._penalised and self._seen_ids:
            idx = self._idx()  # only seen tokens are penalised
            logits[idx] -= p.presence_penalty + p.frequency_penalty * self.counts[idx]
        if self._ban is not None:
            logits[self._ban] = -float("inf")

    def sample(self, logits: torch.Tensor) -> int:
        """Penalise, filter and draw one token from logits [V] (any device; sampling runs on CPU)."""
        return draw_rows(logits.detach().reshape(1, -1), [self])[0]

    def update(self, token: int) -> None:
        """Record a generated token: decay every count, then add this token's weight."""
        if not self._penalised:
            return
        if self._seen_ids and self.params.penalty_decay != 1.0:
            idx = self._idx()
            self.counts[idx] *= self.params.penalty_decay
        self.counts[token] += 1.0 if self.weights is None else float(self.weights[token])
        if not self.seen[token]:
            self.seen[token] = True
            self._seen_ids.append(int(token))

    def __call__(self, logits: torch.Tensor) -> int:
        token = self.sample(logits)
        self.update(token)
        return token


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler], *, inplace: bool = False) -> list[int]:
    """One token per row of logits [B, V], each row with its own sampler, whose counts are updated.

    Rows that share temperature, top-p and top-k are drawn together (module docstring); each gets the
    token its sampler would draw alone. ``inplace=True`` lets it overwrite ``logits`` (float32, CPU).
    """
    tokens = draw_rows(logits, samplers, inplace=inplace)
    for s, t in zip(samplers, tokens):
        s.update(t)
    return tokens


def draw_rows(logits: torch.Tensor, samplers: Sequence[Sampler], *, inplace: bool = False) -> list[int]:
    """``sample_rows`` without recording the tokens in the samplers."""
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(samplers)} samplers")
    ok = inplace and logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.is_contiguous()
    x = logits.detach() if ok else logits.detach().to("cpu", torch.float32, copy=True).contiguous()
    for i, s in enumerate(samplers):
        s.penalize_(x[i])
    top = x.amax(1)  # each row's largest logit, which the draws scale from
    bad = (~torch.isfinite(top)).nonzero().flatten().tolist()  # NaN, +inf or all -inf rows
    for i in bad:
        x[i] = finite_logits(x[i])
        top[i] = x[i].max()
    groups: dict[tuple | None, list[int]] = {}
    for i, s in enumerate(samplers):
        p = s.params
        groups.setdefault(None if p.greedy else (p.temperature, p.top_p, p.top_k), []).append(i)
    tokens = [0] * len(samplers)
    for key, rows in groups.items():
        whole = len(rows) == len(samplers)
        sub, sub_top = (x, top) if whole else (x[rows], top[rows])
        if key is None:
            got = sub.argmax(1).tolist()
        else:
            got = draw_group(sub, *key, [samplers[i].generator for i in rows], sub_top)
        for i, t in zip(rows, got):
            tokens[i] = t
    return tokens
