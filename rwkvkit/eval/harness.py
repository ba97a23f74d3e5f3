"""An lm-evaluation-harness model (``lm_eval.api.model.LM``) over an in-process rwkvkit model.

Registered as ``rwkvkit``. Each request type maps onto ``rwkvkit.scoring`` / ``rwkvkit.generate``:

- ``loglikelihood``: (context, continuation) texts -> tokens as lm-eval's causal models split them
  (trailing whitespace of the context moves to the continuation; the continuation is what the
  whole text adds to the context's tokens), then ``scoring.loglikelihood``: contexts shared by
  several requests (multiple choice) are prefilled once.
- ``loglikelihood_rolling``: the whole text after end-of-document (token 0), streamed through the
  recurrent state by ``scoring.rolling_loglikelihood``: no window, no truncation.
- ``generate_until``: greedy by default (``do_sample``/``temperature`` honoured), ``until`` stop
  strings, ``max_gen_toks``; requests with the same settings decode together in one batch.

Every context is preceded by ``context_prefix`` (default ``"\\n"``, as the RWKV evaluation scripts
of ChatRWKV and RWKV-LM do, so numbers compare with theirs); an empty prefix prepends nothing, and
an empty context then uses token 0. Importing this module needs lm-eval (the ``eval`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .. import scoring
from ..generation import BatchDecoder, Row, TextStream, penalty_weights
from ..sampling import GREEDY, Sampler, SamplingParams

EOD = 0  # end of document: what an RWKV model has seen before a document starts
DEFAULT_MAX_GEN_TOKS = 256
_LM_EVAL_EXTRAS = {"max_batch_size", "trust_remote_code"}  # lm-eval passes them to every model; unused here


def _progress(desc: str, total: int, disable: bool):
    """A tqdm bar (lm-eval depends on tqdm) or None."""
    if disable or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req")


@register_model("rwkvkit")
class RWKVLM(LM):
    """lm-eval's view of an rwkvkit model. Build it around a loaded model and tokenizer, or let
    lm-eval build it from ``model_args`` (``pretrained=PATH,dtype=bf16,quantize=int8,vocab=FILE``)."""

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        *,
        pretrained: str | None = None,
        vocab: str | None = None,
        dtype: str = "fp32",
        quantize: str | None = None,
        device: str | None = "cpu",
        batch_size: int | str | None = scoring.DEFAULT_BATCH_SIZE,
        context_prefix: str = "\n",
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        chunk_len: int = scoring.DEFAULT_CHUNK_LEN,
        **unused: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(unused) - _LM_EVAL_EXTRAS)
        if unknown:
            raise TypeError(f"RWKVLM got unknown arguments {unknown}")
        if model is None:
            if pretrained is None:
                raise ValueError("RWKVLM needs a model, or pretrained=PATH in lm-eval's model_args")
            from .common import load_model, load_tokenizer

            model = load_model(pretrained, device=device or "cpu", dtype=dtype, quantize=quantize)
            tokenizer = load_tokenizer(model, pretrained, vocab)
        if tokenizer is None:
            from ..tokenizer import Tokenizer

            tokenizer = Tokenizer(vocab)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else scoring.DEFAULT_BATCH_SIZE
        self.max_gen_toks, self.chunk_len = int(max_gen_toks), int(chunk_len)
        self.prefix = self.tokenizer.encode(context_prefix) if context_prefix else []
        self._device = model.emb.weight.device

    # ---- tokens ---------------------------------------------------------------------------------
    def context_tokens(self, context: str) -> list[int]:
        """The tokens a context is scored or continued from: the prefix, then the context."""
        ids = self.prefix + self.tokenizer.encode(context)
        return ids or [EOD]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) as lm-eval's causal models split them."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return (self.prefix + ctx) or [EOD], whole[len(ctx) :]

    # ---- lm-eval's three request types ------------------------------------------------------------
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        empty = [i for i, (_, cont) in enumerate(pairs) if not cont]
        if empty:
            raise ValueError(f"request {empty[0]} has an empty continuation: {requests[empty[0]].args!r}")
        bar = _progress("loglikelihood", len(pairs), disable_tqdm)
        seen = [0]

        def progress(done: int, total: int) -> None:
            if bar is not None:
                bar.update(done - seen[0])
                seen[0] = done

        scores = scoring.loglikelihood(
            self.model, pairs, batch_size=self.batch_size, chunk_len=self.chunk_len, progress=progress
        )
        if bar is not None:
            bar.close()
        out = []
        for req, s in zip(requests, scores):
            res = (s.logprob, s.greedy)
            self.cache_hook.add_partial("loglikelihood", req.args, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        bar = _progress("loglikelihood_rolling", len(requests), disable_tqdm)
        out = []
        for req in requests:
            (text,) = req.args[:1]
            ids = [EOD] + self.tokenizer.encode(text)
            s = scoring.rolling_loglikelihood(self.model, ids, chunk_len=self.chunk_len)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), s.logprob)
            out.append(s.logprob)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        settings = [self._gen_settings(req.args[1] if len(req.args) > 1 else {}) for req in requests]
        for i, s in enumerate(settings):
            groups.setdefault(s, []).append(i)
        out: list[str] = [""] * len(requests)
        bar = _progress("generate_until", len(requests), disable_tqdm)
        weights = penalty_weights(self.tokenizer, self.model.config.vocab_size)
        for (until, max_toks, params), idx in groups.items():
            for b in range(0, len(idx), self.batch_size):
                part = idx[b : b + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in part], until, max_toks, params, weights)
                for i, text in zip(part, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                if bar is not None:
                    bar.update(len(part))
        if bar is not None:
            bar.close()
        return out

    # ---- generation -------------------------------------------------------------------------------
    def _gen_settings(self, kw: dict) -> tuple[tuple[str, ...], int, SamplingParams]:
        kw = dict(kw or {})
        until = kw.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_toks = int(kw.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        if kw.pop("do_sample", False) and temperature > 0:
            params = SamplingParams(
                temperature=temperature,
                top_p=float(kw.pop("top_p", 1.0) or 1.0),
                top_k=int(kw.pop("top_k", 0) or 0),
                presence_penalty=0.0,
                frequency_penalty=0.0,
                seed=int(kw.pop("seed", 0) or 0),
            )
        else:
            params = GREEDY
        return until, max_toks, params

    @torch.no_grad()
    def _generate(
        self, contexts: Sequence[str], until: tuple[str, ...], max_toks: int, params: SamplingParams,
        weights: torch.Tensor,
    ) -> list[str]:  # fmt: skip
        """Continue several contexts together (one batched decode), each stopping at ``until``,
        token 0 or ``max_toks`` tokens; the text before the stop string."""
        V = self.model.config.vocab_size
        dec = BatchDecoder(self.model, chunk_len=self.chunk_len)
        streams = [TextStream(self.tokenizer, until) for _ in contexts]
        for ctx, ts in zip(contexts, streams):
            row = Row(
                prompt=self.context_tokens(ctx),
                sampler=Sampler(params, V, weights),
                max_tokens=max_toks,
                stop_tokens=frozenset({EOD}),
                on_token=lambda tok, ts=ts: (ts.feed(tok), ts.stopped)[1],
            )
            dec.add(row)
        while len(dec):
            dec.step()
        for ts in streams:
            ts.finish()
        return [ts.text for ts in streams]
