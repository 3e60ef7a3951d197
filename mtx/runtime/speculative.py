"""Speculative decoding by prompt lookup (n-gram drafts from the row's own tokens), verified in one
multi-token call of the target (docs/ops.md §1 rule 12).

The drafting rule, which the C++ runtime follows too (same drafts, same calls, same bits):
* The context is the row's tokens: prompt, then everything sampled (the last one still pending).
* For ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``: take the context's last ``n``
  tokens and find their latest earlier occurrence (one that does not end at the context's end); the
  draft is the up to ``k`` tokens that followed it. The first ``n`` that matches wins.
* ``k = min(num_tokens, tokens still to sample - 1, W - 1)``; no draft when ``k < 1``.
* Back-off: after a verification that accepted no draft, ``fails`` grows by one and the next
  ``min(2**fails, 32)`` decode steps draft nothing; any accepted draft resets ``fails``. On text that
  does not repeat itself, drafts are rare and the cost is a dictionary lookup per token.

Verification (:func:`verify`): the pending token and the ``k`` drafts are fed at ``p .. p+k``; the
request's own sampling step draws the token at each position in turn from that position's logits,
exactly as plain decoding would (same ``TokenRng`` draw), and a draft is accepted only where it equals
the drawn token. Tokens therefore equal plain decoding's. The rejected drafts' keys are then rolled
back (:func:`rollback`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtx import rolling_kv
from mtx.errors import UsageError
from mtx.runtime.backends import Backend

METHODS = ("ngram",)
MAX_COOLDOWN = 32


@dataclass(frozen=True)
class SpeculativeOptions:
    """``method``: ``"ngram"`` (prompt lookup); ``num_tokens``: most draft tokens per verification;
    ``prompt_lookup_max``/``prompt_lookup_min``: n-gram sizes tried, longest first."""

    method: str = "ngram"
    num_tokens: int = 4
    prompt_lookup_max: int = 3
    prompt_lookup_min: int = 1

    @classmethod
    def parse(cls, value: object) -> SpeculativeOptions | None:
        """From None, a SpeculativeOptions, an int (``num_tokens``) or a mapping with vLLM's names
        (``method``, ``num_tokens`` or ``num_speculative_tokens``, ``prompt_lookup_max/min``)."""
        if value is None or isinstance(value, SpeculativeOptions):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(num_tokens=value)
        if not isinstance(value, Mapping):
            raise UsageError(f"speculative must be an object such as {{\"method\": \"ngram\", \"num_tokens\": 4}}, "
                             f"got {type(value).__name__}", params=("speculative",))
        known = {"method", "num_tokens", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
        extra = sorted(set(value) - known)
        if extra:
            raise UsageError(f"speculative.{extra[0]}: unknown field (known: {', '.join(sorted(known))})",
                             params=("speculative",))
        kw = dict(value)
        if "num_speculative_tokens" in kw:
            kw.setdefault("num_tokens", kw.pop("num_speculative_tokens"))
            kw.pop("num_speculative_tokens", None)
        return cls(**kw)

    def validate(self, window: int | None, capacity: int) -> None:
        """UsageError naming the field unless the options are usable on a model of this window."""
        if self.method not in METHODS:
            raise UsageError(f"speculative.method must be one of {', '.join(METHODS)}, got {self.method!r}",
                             params=("speculative",))
        for name in ("num_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"speculative.{name} must be an integer >= 1, got {v!r}", params=("speculative",))
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise UsageError(f"speculative.prompt_lookup_min {self.prompt_lookup_min} exceeds prompt_lookup_max "
                             f"{self.prompt_lookup_max}", params=("speculative",))
        most = rolling_kv.max_draft_tokens(window, capacity)
        if self.num_tokens > most:
            raise UsageError(f"speculative.num_tokens {self.num_tokens} exceeds {most}, the window minus one "
                             f"(docs/ops.md §1 rule 12)", params=("speculative",))


class NgramProposer:
    """Prompt-lookup drafts for one row; see the module docstring for the rule."""

    def __init__(self, options: SpeculativeOptions, context: Iterable[int] = ()) -> None:
        self.options = options
        self.context: list[int] = []
        self._latest: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in range(options.prompt_lookup_min, options.prompt_lookup_max + 1)}
        self.fails = 0
        self.cooldown = 0
        self.extend(context)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens to the context (the n-grams ending before each new token become searchable)."""
        ctx = self.context
        for tok in tokens:
            t = len(ctx)
            for n, latest in self._latest.items():
                if t >= n:
                    latest[tuple(ctx[t - n:t])] = t - n
            ctx.append(int(tok))

    def propose(self, most: int) -> list[int]:
        """Draft tokens for the next verification (at most ``most``; empty: decode plainly this step)."""
        if self.cooldown > 0:
            self.cooldown -= 1
            return []
        k = min(self.options.num_tokens, most)
        if k < 1:
            return []
        ctx = self.context
        for n in range(self.options.prompt_lookup_max, self.options.prompt_lookup_min - 1, -1):
            if len(ctx) <= n:
                continue
            start = self._latest[n].get(tuple(ctx[-n:]))
            if start is not None:
                return ctx[start + n:start + n + k]
        return []

    def record(self, accepted: int) -> None:
        """After a verification: back off while drafts keep failing."""
        if accepted == 0:
            self.fails += 1
            self.cooldown = min(2 ** self.fails, MAX_COOLDOWN)
        else:
            self.fails = 0


@dataclass
class SpeculativeStats:
    """Verification calls, draft tokens fed and accepted (acceptance rate = accepted / drafted)."""

    verifications: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass
class Verification:
    """One verification call's result: logits [k+1, V] (float32) and what rollback needs."""

    start: int
    drafts: int
    logits: np.ndarray
    saved: tuple[range, np.ndarray, np.ndarray] | None


def verify(backend: Backend, state: Any, row: int, start: int, pending: int, drafts: Sequence[int]) -> Verification:
    """Feed ``pending`` at ``start`` and ``drafts`` after it in one call of ``row``, saving first the live
    positions the call may destroy (:func:`mtx.rolling_kv.verify_saves`)."""
    k = len(drafts)
    backend.check_positions(start + k + 1)
    saves = rolling_kv.verify_saves(backend.kv_layout, start, k, backend.window, backend.capacity)
    saved = (saves, *backend.read_positions(state, row, start, saves)) if len(saves) else None
    ids = np.asarray([[pending, *drafts]], dtype=np.int64)
    logits = backend.run(state, slice(row, row + 1), ids, np.asarray([start], dtype=np.int64), last_only=False)[0]
    return Verification(start, k, logits, saved)


def rollback(backend: Backend, state: Any, row: int, v: Verification, accepted: int) -> None:
    """Make ``row``'s state the one at ``v.start + accepted + 1`` after a verification (rule 12)."""
    restore, moved = rolling_kv.rollback_moves(backend.kv_layout, v.start, v.drafts, accepted, backend.window,
                                               backend.capacity)
    new = v.start + accepted + 1
    if len(moved):
        keys, values = backend.read_positions(state, row, v.start + v.drafts + 1, moved)
        backend.write_positions(state, row, new, moved.start, keys, values)
    if len(restore):
        assert v.saved is not None and v.saved[0].start <= restore.start and restore.stop <= v.saved[0].stop
        lo, hi = restore.start - v.saved[0].start, restore.stop - v.saved[0].start
        backend.write_positions(state, row, new, restore.start, v.saved[1][:, :, lo:hi], v.saved[2][:, :, lo:hi])


def accept(v: Verification, drafts: Sequence[int], sample: Callable[[np.ndarray], tuple[int, bool]]) -> int:
    """Draw tokens position by position with ``sample(logits) -> (token, finished)`` until a token differs
    from its draft or the request finishes. Returns how many drafts were accepted."""
    accepted = 0
    for i in range(v.drafts + 1):
        token, finished = sample(v.logits[i])
        if finished or i == v.drafts or token != drafts[i]:
            break
        accepted += 1
    return accepted
