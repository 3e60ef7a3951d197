"""The decisions of the generation core, as pure functions: no model, no threads, no clock.

A row of the core's KV state is ``IDLE`` (no request), ``PREFILL`` (its prompt is being fed) or
``DECODE`` (it holds a sampled token to feed at its next position). The scheduler decides

* **admission** (:func:`admit`): waiting requests, oldest first, into the lowest free rows, between
  steps. A request starts at position 0 of its row; nothing of the row's earlier sequence is resident
  for it (docs/ops.md §1 rule 3).
* **the step plan** (:func:`plan_step`): which graph calls one step runs —
  - one verification call per VERIFY row (a DECODE row with speculative draft tokens this step, fed with
    its pending token: docs/ops.md §1 rule 12);
  - one decode call per maximal run of rows free of PREFILL and VERIFY rows, trimmed to its DECODE rows (IDLE rows
    inside a run are fed a dummy token at position 0, harmless by rule 3) — unless the step *defers
    decode*: while prompts are being prefilled, decode is skipped until ``max_deferred_tokens`` prompt
    tokens have been fed since the last decode. A burst of arrivals is then prefilled before anyone
    decodes, so a stream stalls once per burst instead of once per prefill step (the p99 inter-token
    latency), and the prompts get the whole budget (the time to first token);
  - prefill chunks of PREFILL rows in admission order until the step's token budget is spent (each
    DECODE row in the step costs one token, a VERIFY row its draft and pending tokens). Chunks are
    **canonical** (docs/ops.md §1 rule 7): a chunk ends at the next multiple of ``max_chunk`` (the
    prefill block) or at the prompt's end, and is never cut by the budget — a row whose chunk does not
    fit waits for a later step, except the first chunk of a step, which always runs so a prompt
    progresses. A row's bits then do not depend on the load, and prefix-cache blocks are exact;
    where contiguous rows with chunks of the same length go in ONE call, as the graph allows: every
    target takes rows of equal chunk length at any positions (docs/ops.md §1 rule 2), except where the
    manifest says ``multi_token_batch = "first_call_only"`` (only rows whose chunk starts at position 0
    share a multi-token call).
* **finishing** (:func:`finish_reason`): stop token or stop string, else the token limit.
* **preemption**: none. Every admitted row owns its KV slots for its whole life (fixed memory, no paged
  cache), so nothing is ever evicted to make room; a request waits until a row is free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


class Phase(Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"
    VERIFY = "verify"  # a DECODE row that feeds draft tokens after its pending token this step


@dataclass(frozen=True)
class RowView:
    """What the scheduler sees of a row: its phase, prompt tokens still to feed, the position of its next
    token, its admission order (lower = older), and (VERIFY) its draft tokens."""

    phase: Phase
    prefill_left: int = 0
    position: int = 0
    order: int = 0
    drafts: int = 0


@dataclass(frozen=True)
class PrefillCall:
    """One multi-token call: rows ``rows`` (contiguous) each feed ``tokens`` prompt tokens."""

    rows: slice
    tokens: int


@dataclass
class StepPlan:
    """``decode_spans``: row ranges of one decode call each; ``verify``: rows of one verification call
    each; ``prefill``: calls in admission order."""

    decode_spans: list[slice] = field(default_factory=list)
    prefill: list[PrefillCall] = field(default_factory=list)
    verify: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode_spans and not self.prefill and not self.verify


def admit(free_rows: Sequence[int], n_waiting: int) -> list[int]:
    """Rows for the oldest ``n_waiting`` requests: the i-th oldest gets the i-th lowest free row."""
    return sorted(free_rows)[:n_waiting]


def decode_spans(phases: Sequence[Phase]) -> list[slice]:
    """Maximal row ranges free of PREFILL and VERIFY rows, trimmed to their first and last DECODE row."""
    spans: list[slice] = []
    first = last = -1
    for r, phase in enumerate([*phases, Phase.PREFILL]):  # a sentinel closes the last range
        if phase in (Phase.PREFILL, Phase.VERIFY):
            if first >= 0:
                spans.append(slice(first, last + 1))
            first = last = -1
        elif phase is Phase.DECODE:
            if first < 0:
                first = r
            last = r
    return spans


def prefill_chunks(rows: Sequence[RowView], budget: int, max_chunk: int) -> dict[int, int]:
    """Tokens each PREFILL row feeds this step: in admission order, each row its canonical chunk
    (:func:`canonical_chunk`) while ``budget`` lasts; the first chunk of the step runs even if it
    exceeds the budget, a later one that does not fit stops the step's prefill."""
    chunks: dict[int, int] = {}
    for r in sorted((r for r, v in enumerate(rows) if v.phase is Phase.PREFILL), key=lambda r: rows[r].order):
        n = canonical_chunk(rows[r].position, rows[r].prefill_left, max_chunk)
        if n > budget and chunks:
            break
        chunks[r] = n
        budget -= n
    return chunks


def canonical_chunk(position: int, left: int, block: int) -> int:
    """Tokens of the call that feeds a row at ``position`` with ``left`` tokens to go: up to the next
    multiple of ``block``, or the end (docs/ops.md §1 rule 7). ``left`` >= 1, ``block`` >= 1."""
    return min(left, block - position % block)


def group_calls(rows: Sequence[RowView], chunks: dict[int, int], first_call_only: bool) -> list[PrefillCall]:
    """Contiguous rows with equal chunk lengths merged into one call (and, with ``first_call_only``, only
    rows at position 0 share a call of more than one token). Calls are ordered by their oldest row."""
    calls: list[PrefillCall] = []
    run: list[int] = []

    def close() -> None:
        if run:
            calls.append(PrefillCall(slice(run[0], run[-1] + 1), chunks[run[0]]))
            run.clear()

    def joins(r: int) -> bool:
        if not run or r != run[-1] + 1 or chunks[r] != chunks[run[0]]:
            return False
        if first_call_only and chunks[r] > 1:
            return rows[r].position == 0 and rows[run[0]].position == 0
        return True

    for r in sorted(chunks):
        if not joins(r):
            close()
        run.append(r)
    close()
    calls.sort(key=lambda c: min(rows[r].order for r in range(c.rows.start, c.rows.stop)))
    return calls


def defer_decode(rows: Sequence[RowView], deferred_tokens: int, max_deferred_tokens: int) -> bool:
    """Whether this step skips decode: prompts are waiting to be fed, some row could decode, and fewer
    than ``max_deferred_tokens`` prompt tokens were fed while decode waited (``deferred_tokens``)."""
    phases = [v.phase for v in rows]
    decoding = Phase.DECODE in phases or Phase.VERIFY in phases
    return Phase.PREFILL in phases and decoding and deferred_tokens < max_deferred_tokens


def plan_step(rows: Sequence[RowView], token_budget: int, max_chunk: int, first_call_only: bool = False,
              deferred_tokens: int = 0, max_deferred_tokens: int = 0) -> StepPlan:
    """The calls of one step. ``token_budget`` >= 1, ``max_chunk`` >= 1; see :func:`defer_decode`."""
    phases = [v.phase for v in rows]
    if defer_decode(rows, deferred_tokens, max_deferred_tokens):
        spans: list[slice] = []
        verify: list[int] = []
        n_decode = 0
    else:
        spans = decode_spans(phases)
        verify = [r for r, p in enumerate(phases) if p is Phase.VERIFY]
        n_decode = sum(1 for p in phases if p is Phase.DECODE) + sum(rows[r].drafts + 1 for r in verify)
    chunks = prefill_chunks(rows, max(token_budget - n_decode, 1), max_chunk)
    return StepPlan(spans, group_calls(rows, chunks, first_call_only), verify)


def finish_reason(n_generated: int, max_new_tokens: int, stopped: bool) -> str | None:
    """Why a request ends after its latest token: ``"stop"`` (a stop token or stop string), ``"length"``
    (``max_new_tokens`` reached), or None (it goes on)."""
    if stopped:
        return "stop"
    if n_generated >= max_new_tokens:
        return "length"
    return None
