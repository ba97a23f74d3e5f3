"""How waiting prompts enter ``rwkvkit.decoder.BatchDecoder``'s batch (its ``Admission`` part): each
step first feeds waiting prompts, then decodes.

Slices (``interleave=N``): N prompt tokens per step in all while rows are decoding (several short
prompts, or a slice of a long one; waiting prompts take turns), ``chunk_len`` with nothing decoding; a
prompt joins the batch when it is complete (``_join``), stored in the prefix cache.

Together (``ride=R``, with ``interleave``): while no row is decoding, the waiting prompts with at most
``R`` tokens left (a burst of requests on an idle engine) are fed together in one ``[k, T]`` forward,
as many tokens each as the shortest has left (``prefill.prefill_together``); the complete ones join the
batch and the others ride from the same step on.

Riding (``ride=R``, with ``interleave``): while rows are decoding, a prompt with at most ``R`` tokens
left to feed (a short prompt, the new message of a cached chat, or the tail of a sliced long one)
joins the batch at once and feeds one prompt token per step through the same ``[B, 1]`` forward,
sampling nothing until its last prompt token is in. A separate prefill call reads every weight for a
handful of tokens (a 10-token prompt costs about two single-row steps), and every decoding row waits
for it; a riding row costs the step about one more row's compute. Its first token comes after as many
steps as it had prompt tokens left. Prompts with ``echo`` (which need every position's scores) or
copies (``n`` > 1) do not ride.
"""

from __future__ import annotations

import torch

from .prefill import prefill, prefill_together
from .row import PromptFeed, Row
from .scoring import token_logprobs
from .state import State


class Admission:
    """``BatchDecoder``'s prompt side (a mixin: the decoder owns the attributes it reads: ``model``,
    ``cache``, ``prefilling``, ``rows``, ``_state``, ``_logits``, ``_device``, ``chunk_len``,
    ``interleave``, ``ride``, and ends rows with its ``_finish``)."""

    def _start(self, p: PromptFeed) -> None:
        """Before the first slice: the start state, or the longest cached prefix (not for echo rows,
        which need every prompt position's logits)."""
        row = p.row
        p.started = True
        p.state = row.state.clone() if row.state is not None else None
        if not row.prompt and row.start_logits is not None:  # nothing to feed: decode from these
            p.logits = row.start_logits.detach().float().reshape(-1)
        if self.cache is not None and row.state is None and not row.echo:
            p.done, p.state, p.logits = self.cache.lookup(row.prompt)
            for r in p.rows:
                r.cached_tokens = p.done

    def _feed(self, p: PromptFeed, n: int) -> None:
        """Feed the next ``n`` prompt tokens of ``p`` (scoring them for echo rows); when the prompt is
        complete, store it in the prefix cache."""
        row = p.row
        piece = row.prompt[p.done : p.done + n]
        if row.echo:
            k = row.logprobs or 0
            s = token_logprobs(self.model, piece, p.state, p.logits, top_n=k, chunk_len=self.chunk_len)
            p.lps += s.logprobs
            p.tops += s.top if s.top is not None else [None if lp is None else [] for lp in s.logprobs]
            p.logits, p.state = s.logits, s.state
        else:
            p.logits, p.state = prefill(self.model, piece, p.state, chunk_len=self.chunk_len)
        p.done += len(piece)
        if p.done == len(row.prompt) and self.cache is not None and row.state is None:
            self.cache.store(row.prompt, p.state, p.logits)

    def _join(self, p: PromptFeed, logits: torch.Tensor, state: State, finished: list[Row]) -> None:
        """Add the rows of a prefilled prompt to the decoding batch (finished: those that want no tokens)."""
        lg = logits.reshape(1, -1).to(self._device)
        joining: list[Row] = []
        for r in p.rows:
            if r.echo:
                r.prompt_logprobs, r.prompt_top_logprobs = p.lps, p.tops
            if r.cancelled:
                self._finish(r, "cancelled", None, None)
                finished.append(r)
            elif r.max_tokens == 0:
                self._finish(r, "length", state.clone() if p.copies else state, logits)
                finished.append(r)
            else:
                joining.append(r)
        if not joining:
            return
        self.rows += joining
        parts = [state] * len(joining)
        self._state = State.stack(parts if self._state is None else [self._state, *parts])
        lgs = lg.expand(len(joining), -1)
        self._logits = lgs.clone() if self._logits is None else torch.cat([self._logits, lgs])

    @torch.no_grad()
    def _prefill_slice(self, finished: list[Row]) -> None:
        """Feed waiting prompts, in turn, ``interleave`` tokens in all (``chunk_len`` when no row is
        decoding): several short prompts, or one slice of a long one. Completed prompts join the batch."""
        for p in [p for p in self.prefilling if all(r.cancelled for r in p.rows)]:
            self.prefilling.remove(p)
            for r in p.rows:
                self._finish(r, "cancelled", None, None)
                finished.append(r)
        if self.ride and not self.rows:
            self._prefill_together(finished)
        budget = self.interleave if self.rows else self.chunk_len
        if self.ride and self.rows:
            self._board_riders(finished)
        while budget > 0 and self.prefilling:
            p = self.prefilling.pop(0)
            row = p.row
            try:
                if not p.started:
                    self._start(p)
                if self._rides(p):
                    self._board(p)
                    continue
                n = min(budget, len(row.prompt) - p.done)
                if n > 0:
                    self._feed(p, n)
                    budget -= n
            except Exception as e:  # noqa: BLE001 - a prompt the model rejects fails alone
                for r in p.rows:
                    r.finish_reason, r.error = "error", f"{type(e).__name__}: {e}"
                    finished.append(r)
                continue
            if p.done < len(row.prompt):
                self.prefilling.append(p)  # its budget is spent; the next waiting prompt goes first
                return
            assert p.logits is not None and p.state is not None
            self._join(p, p.logits, p.state, finished)

    def _rides(self, p: PromptFeed) -> bool:
        """Whether prompt ``p`` feeds the rest of its prompt through the decode step (not started yet:
        whether it may, before the prefix cache says how much of it is left)."""
        row, left = p.row, len(p.row.prompt) - p.done
        return bool(
            self.ride
            and self.rows
            and (0 < left or not p.started)
            and left <= self.ride
            and not p.copies
            and not row.echo
            and row.max_tokens > 0
        ) and hasattr(self.model, "init_state")

    def _prefill_together(self, finished: list[Row]) -> None:
        """With no row decoding, the waiting prompts short enough to ride (echo rows aside) are fed
        together, as many tokens each as the shortest has left (``prefill_together``: one weight read);
        the complete ones join the batch, the others stay to ride: a burst of requests on an idle engine
        starts at once instead of one prefill after another with the later ones riding behind."""
        group = []
        for p in self.prefilling:
            if p.row.echo or not hasattr(self.model, "init_state"):
                continue
            try:
                if not p.started:
                    self._start(p)
            except Exception:  # noqa: BLE001 - it fails alone, on the usual path
                continue
            if 0 < len(p.row.prompt) - p.done <= self.ride and not all(r.cancelled for r in p.rows):
                group.append(p)
        if len(group) < 2:
            return
        try:
            prefill_together(self.model, group)
        except Exception:  # noqa: BLE001 - each prompt goes on alone from where it is (and fails alone)
            return
        for p in group:
            if p.done < len(p.row.prompt):
                continue  # it rides the rest (_board_riders, next)
            self.prefilling.remove(p)
            if self.cache is not None and p.row.state is None:
                self.cache.store(p.row.prompt, p.state, p.logits)
            assert p.logits is not None and p.state is not None
            self._join(p, p.logits, p.state, finished)

    def _board_riders(self, finished: list[Row]) -> None:
        """Let every waiting prompt short enough to ride join the batch (before the slice budget is spent)."""
        for p in list(self.prefilling):
            if not self._rides(p):
                continue  # (p.done only grows, so a prompt that is too long now may ride later)
            try:
                if not p.started:
                    self._start(p)
            except Exception as e:  # noqa: BLE001 - a prompt the model rejects fails alone
                self.prefilling.remove(p)
                p.row.finish_reason, p.row.error = "error", f"{type(e).__name__}: {e}"
                finished.append(p.row)
                continue
            if self._rides(p):
                self.prefilling.remove(p)
                self._board(p)

    def _board(self, p: PromptFeed) -> None:
        """Add prompt ``p``'s row to the decoding batch with the prompt tokens it has left to feed."""
        row = p.row
        state = p.state if p.state is not None else self.model.init_state(1)
        row._ride = list(row.prompt[p.done :])
        self.rows.append(row)
        assert self._state is not None and self._logits is not None
        self._state = State.stack([self._state, state])
        self._logits = torch.cat([self._logits, self._logits.new_zeros(1, self._logits.shape[1])])
