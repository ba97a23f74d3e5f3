"""Sampling as RWKV users know it: small pure functions on one row of logits, and their composition.

The semantics follow ``rwkv.utils.PIPELINE`` (the reference ChatRWKV pipeline), step by step:

1. banned tokens get ``-inf``;
2. every token seen so far loses ``presence + count * frequency`` from its logit, where ``count`` is
   a per-token weight sum that decays by ``alpha_decay`` each generated token (``penalize``/``Penalty``);
3. softmax; top-p keeps every token whose probability is at least the probability at which the
   sorted cumulative sum first reaches ``top_p``; top-k keeps the ``top_k`` most probable;
4. temperature raises the kept probabilities to ``1 / temperature`` (same as dividing logits);
5. one token is drawn with a seeded ``torch.Generator``.

``temperature == 0`` means greedy: the argmax of the penalised logits (the reference does the same
through ``top_p = 0``). One deliberate deviation: ``top_p >= 1`` keeps every token (the reference's
float cumsum can fall short of 1.0 and then silently turns sampling greedy).

Everything here works on a 1-D ``[V]`` tensor for one sequence; batched decoding calls it per row,
because each row has its own parameters, penalty counts and generator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch


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
        object.__setattr__(self, "token_ban", tuple(int(t) for t in self.token_ban))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)  # type: ignore[arg-type]


GREEDY = SamplingParams(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)


# ---- pure functions on one row of logits / probabilities ------------------------------------------
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


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every probability below the cutoff where the descending cumulative sum first reaches top_p.

    The sort and the float32 cumulative sum are done in NumPy, as the reference does (and ~20x
    faster than ``torch.sort`` on a 65536-entry vocabulary on CPU).
    """
    if top_p >= 1.0:
        return probs
    p = probs.detach().float().cpu().numpy()
    # Tokens below (1 - top_p) / V hold less than 1 - top_p in total, so the cutoff is never below
    # that: sorting only the tokens above it gives the same prefix sums, hence the same cutoff.
    cand = p[p >= (1.0 - top_p) / p.size]
    desc = np.sort(cand if cand.size else p)[::-1]
    cum = np.cumsum(desc)
    reached = cum >= top_p
    cutoff = float(desc[int(np.argmax(reached))] if reached.any() else desc[-1])
    return torch.where(probs < cutoff, torch.zeros_like(probs), probs)


def top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` most probable entries (0 or >= V keeps all)."""
    if top_k <= 0 or top_k >= probs.numel():
        return probs
    keep = torch.topk(probs, top_k).indices
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out


def apply_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Raise probabilities to ``1 / temperature`` and renormalise (``softmax(logits / T)`` on the kept set)."""
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return probs / probs.sum()


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a token is drawn from, after top-p, top-k and temperature (non-greedy)."""
    probs = torch.softmax(logits.float(), dim=-1)
    probs = top_p_filter(probs, params.top_p)
    probs = top_k_filter(probs, params.top_k)
    return apply_temperature(probs, params.temperature)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with ``seed`` (a fresh random seed when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def sample_logits(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """Draw one token from already-penalised logits [V] (bans are applied here)."""
    logits = ban_tokens(logits, params.token_ban)
    if params.greedy:
        return int(torch.argmax(logits))
    return draw(probabilities(logits, params), generator)


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
    ``rwkvkit.generate.penalty_weights``). Tokens with weight 0 still get the presence penalty.
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
        for t in self.params.token_ban:
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token_ban contains {t}, outside the vocabulary [0, {self.vocab_size})")

    def sample(self, logits: torch.Tensor) -> int:
        """Penalise, filter and draw one token from logits [V] (any device; sampling runs on CPU)."""
        logits = logits.detach().float().cpu()
        p = self.params
        if self._seen_ids and (p.presence_penalty or p.frequency_penalty):
            idx = torch.tensor(self._seen_ids, dtype=torch.long)  # only seen tokens are penalised
            logits = logits.clone()
            logits[idx] -= p.presence_penalty + p.frequency_penalty * self.counts[idx]
        return sample_logits(logits, p, self.generator)

    def update(self, token: int) -> None:
        """Record a generated token: decay every count, then add this token's weight."""
        if self._seen_ids and self.params.penalty_decay != 1.0:
            idx = torch.tensor(self._seen_ids, dtype=torch.long)
            self.counts[idx] *= self.params.penalty_decay
        self.counts[token] += 1.0 if self.weights is None else float(self.weights[token])
        if not self.seen[token]:
            self.seen[token] = True
            self._seen_ids.append(int(token))

    def __call__(self, logits: torch.Tensor) -> int:
        token = self.sample(logits)
        self.update(token)
        return token


def sample_rows(logits: torch.Tensor, samplers: Sequence[Sampler]) -> list[int]:
    """One token per row of logits [B, V], each row with its own sampler (greedy rows argmax together)."""
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(samplers)} samplers")
    logits = logits.detach().float().cpu()
    return [s(logits[i]) for i, s in enumerate(samplers)]
