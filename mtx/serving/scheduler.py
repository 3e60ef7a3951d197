"""What one engine step runs: the decisions of continuous batching, with no model and no threads.

A row of the engine's KV state is ``IDLE`` (no request), ``PREFILL`` (its prompt is being fed) or
``DECODE`` (it holds a sampled token to feed at its next position). One step runs

* decode calls over contiguous row spans that cover every ``DECODE`` row and no ``PREFILL`` row
  (``IDLE`` rows inside a span are fed a dummy token at position 0: rule 3 of docs/ops.md §1 makes
  that harmless, since a request admitted to the row starts again at position 0 and sees nothing of
  it), then
* prefill chunks of ``PREFILL`` rows in admission order, one row per call (rows differ in length and
  the graph has no padding, docs/ops.md §1.9), until the step's token budget is spent.

Each decode row costs one token of the budget; prefill gets the rest, but at least one token a step,
so a prompt always progresses. A chunk is at most ``max_chunk`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


class Phase(Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class StepPlan:
    """``decode_spans``: row ranges for one decode call each; ``prefill``: (row, tokens) chunks in order."""

    decode_spans: list[slice] = field(default_factory=list)
    prefill: list[tuple[int, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode_spans and not self.prefill


def decode_spans(phases: Sequence[Phase]) -> list[slice]:
    """Maximal row ranges free of PREFILL rows, trimmed to their first and last DECODE row."""
    spans: list[slice] = []
    first = last = -1
    for r, phase in enumerate([*phases, Phase.PREFILL]):  # a sentinel closes the last range
        if phase is Phase.PREFILL:
            if first >= 0:
                spans.append(slice(first, last + 1))
            first = last = -1
        elif phase is Phase.DECODE:
            if first < 0:
                first = r
            last = r
    return spans


def plan_step(phases: Sequence[Phase], prefill_left: dict[int, int], prefill_order: Sequence[int],
              token_budget: int, max_chunk: int) -> StepPlan:
    """The plan of one step.

    ``prefill_left[row]``: prompt tokens still to feed for each PREFILL row; ``prefill_order``: those
    rows, oldest admission first. ``token_budget`` >= 1 and ``max_chunk`` >= 1.
    """
    spans = decode_spans(phases)
    n_decode = sum(1 for p in phases if p is Phase.DECODE)
    budget = max(token_budget - n_decode, 1)
    chunks: list[tuple[int, int]] = []
    for row in prefill_order:
        if budget <= 0:
            break
        n = min(prefill_left[row], max_chunk, budget)
        if n > 0:
            chunks.append((row, n))
            budget -= n
    return StepPlan(spans, chunks)
