"""One request's token step (the one sampling step): sample from its row's logits, detokenize, decide
whether it finishes. Every front end's tokens come from :meth:`RowDecoder.step`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mtx.runtime.request import Request
from mtx.runtime.sampling import TokenLogprobs, TokenRng, select_token, token_logprobs
from mtx.runtime.scheduler import finish_reason


@dataclass(frozen=True)
class TokenOutput:
    """The result of one step of one request: the sampled ``token``, the visible ``text`` it adds (``""``
    without a tokenizer or while text is held back; at the end, everything left), and ``finish_reason``
    (``"stop"``, ``"length"``) or None; ``logprobs`` when the request asks for them (else None)."""

    token: int
    text: str
    finish_reason: str | None
    logprobs: TokenLogprobs | None = None


class RowDecoder:
    """Sampling state of one request: its ``TokenRng``, generated ids, and text stream (when it needs text).

    ``history``: ids before the prompt already in the row (a session's earlier turns), which the
    repetition penalty counts as seen, as it counts the prompt.
    """

    def __init__(self, request: Request, tokenizer: Any | None, history: tuple[int, ...] = ()) -> None:
        self.request = request
        self.rng = TokenRng(request.seed, stream=request.rng_stream)
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self._seen_prefix = history + request.prompt_ids
        self.text = None
        #: The grammar's state for a constrained request (None: no mask work at all).
        self.constraint = request.constraint.start() if request.constraint is not None else None
        if request.needs_text:
            from mtx.runtime.detokenizer import TextStream

            self.text = TextStream(tokenizer, request.stop)

    def step(self, logits: np.ndarray) -> TokenOutput:
        """Sample the next token from logits [V] (float32) and record it. Raises ValueError on NaN logits.

        With a constraint, the token is drawn among those its grammar allows, and the request stops once
        the grammar is complete. With ``request.logprobs`` set, the chosen token's log-probability and the
        top alternatives are those of ``logits`` as given (before penalties, temperature, filters and the
        grammar's mask); otherwise none are computed."""
        req = self.request
        seen = generated = None
        if req.sampling.repetition_penalty != 1.0:
            seen = np.asarray(self._seen_prefix + tuple(self.generated), dtype=np.int64)
        if req.sampling.counts_generated:
            generated = np.asarray(self.generated, dtype=np.int64)
        if self.constraint is None:
            token = select_token(logits, req.sampling, self.rng, seen, generated)
        else:  # only a constrained row pays for its mask
            token = self.constraint.select(logits, req.sampling, self.rng, seen, generated)
        lp = None if req.logprobs is None else token_logprobs(logits, token, req.logprobs)
        self.generated.append(token)
        stopped = token in req.stop_token_ids
        if self.constraint is not None:
            stopped = self.constraint.advance(token) or stopped
        text = ""
        if self.text is not None:
            text, stopped_by_text = self.text.push(token)
            stopped = stopped or stopped_by_text
        self.finish_reason = finish_reason(len(self.generated), req.max_new_tokens, stopped)
        if self.finish_reason is not None and self.text is not None:
            text += self.text.finish()
        return TokenOutput(token, text, self.finish_reason, lp)
