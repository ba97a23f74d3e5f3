"""Scoring text with an RWKV model: log-probabilities of tokens, continuations and whole documents.

Public functions over token ids (no tokenizer here; ``rwkvkit.eval`` and the server add text):

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
- ``score_logits``: the log-probabilities (greedy flags, top-N) of given tokens under given logits,
  for a caller that already has them (a server reporting the logprobs of what it sampled).

Logits [B, T, V] fp32 are the big tensor here (V = 65536: 256 KiB per position), so each model
call is bounded in positions (``batch_tokens``, ``chunk_len``) and its log-softmax is computed in
place: gather the scored logits, argmax and top-N first, then a log-sum-exp that reuses the
logits' memory. Sums are accumulated in float64.
"""

from .pairs import ContinuationScore, loglikelihood
from .tokens import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_BATCH_TOKENS,
    DEFAULT_CHUNK_LEN,
    DEFAULT_MIN_SHARED,
    RollingScore,
    TokenScores,
    rolling_loglikelihood,
    score_logits,
    token_logprobs,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_BATCH_TOKENS",
    "DEFAULT_CHUNK_LEN",
    "DEFAULT_MIN_SHARED",
    "ContinuationScore",
    "RollingScore",
    "TokenScores",
    "loglikelihood",
    "rolling_loglikelihood",
    "score_logits",
    "token_logprobs",
]
