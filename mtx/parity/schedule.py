"""The sequence of engine calls ``mtx parity`` makes: a chunked prefill, then single-token decoding.

Positions are absolute (docs/ops.md §1): call ``k`` feeds tokens ``start .. start + length - 1``.
The prefill is cut into chunks of ``chunk`` tokens (the last may be shorter); the default chunk does
not divide the window W, so chunk boundaries fall across window and buffer boundaries, where the
known bugs of this family show. Decoding is one token per call; by default it runs for
``3 * C + chunk`` steps, i.e. past three full wraps of the rolling buffer. Full attention
(``window = 0``) has no wraps: the run stays within the capacity (rule 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtx import rolling_kv
from mtx.errors import UsageError

#: Largest default prefill chunk (a chunk of W/3 tokens is fine for a window of 8, not of 4096).
MAX_DEFAULT_CHUNK = 257
#: Longest default prompt / decode for full attention, whose capacity may be the whole context.
MAX_DEFAULT_FULL = 1024


@dataclass(frozen=True)
class Call:
    """One engine call: ``length`` tokens at positions ``start ..``; ``phase`` is prefill or decode."""

    start: int
    length: int
    phase: str

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Schedule:
    """The whole run. ``window`` is the op attribute (0 = full attention), ``effective_window`` W."""

    window: int
    capacity: int
    chunk: int
    prompt_ids: list[int]
    steps: int
    calls: list[Call]
    notes: list[str]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def positions(self) -> int:
        """Number of positions with logits: the prompt plus one per decode step."""
        return self.prompt_len + self.steps

    @property
    def effective_window(self) -> int:
        return rolling_kv.effective_window(self.window, self.capacity)

    def window_boundaries(self) -> list[int]:
        """Positions k·W (k >= 1) inside the run: the first positions whose window drops a key."""
        w = self.effective_window
        return list(range(w, self.positions, w)) if self.window else []

    def buffer_wraps(self) -> list[int]:
        """Positions k·C (k >= 1) inside the run: where slot p mod C starts over."""
        return list(range(self.capacity, self.positions, self.capacity))


def default_chunk(window: int) -> int:
    """A prefill chunk of about W/3 tokens (at most 257, at least 2) that does not divide W."""
    n = max(2, min(window // 3 + 1, MAX_DEFAULT_CHUNK))
    while window % n == 0:
        n += 1
    return n


def plan_schedule(*, window: int, capacity: int, max_position: int | None, vocab_size: int,
                  prompt_ids: list[int] | None, prompt_len: int | None, steps: int | None, chunk: int | None,
                  seed: int) -> Schedule:
    """Choose the calls. ``prompt_ids`` (from ``--prompt``) wins over ``prompt_len`` random ids from ``seed``.

    Raises UsageError when the run cannot fit the export (full attention past C, positions past
    ``max_position``); returns notes where it is weaker than the default (fewer than 3 wraps, ...).
    """
    windowed = window > 0
    w = rolling_kv.effective_window(window, capacity)
    chunk = chunk or default_chunk(w)
    notes: list[str] = []
    if prompt_ids is None:
        if prompt_len is None:
            prompt_len = 2 * capacity + 1 if windowed else min(capacity // 2 + 1, MAX_DEFAULT_FULL)
        prompt_ids = np.random.default_rng(seed).integers(0, vocab_size, size=prompt_len).tolist()
    p = len(prompt_ids)
    if steps is None:
        steps = 3 * capacity + chunk if windowed else max(0, min(capacity - p, MAX_DEFAULT_FULL))
    total = p + steps

    if not windowed and total > capacity:
        raise UsageError(f"prompt_len/steps: {p} + {steps} = {total} positions exceed the KV capacity {capacity} "
                         f"of this full-attention export (docs/ops.md §1 rule 8); use fewer, or export with a larger "
                         f"cache capacity", params=("prompt_len", "steps"))
    if max_position is not None and total > max_position:
        raise UsageError(f"prompt_len/steps: {total} positions exceed max_position {max_position} of this export "
                         f"(its rotary tables); use fewer, or export with a larger max_position",
                         params=("prompt_len", "steps"))
    if windowed:
        if steps < 3 * capacity:
            notes.append(f"decoding runs {steps} steps, fewer than 3 wraps of the buffer (3·C = {3 * capacity}): "
                         f"errors that need several wraps to show may be missed")
        if p <= w:
            notes.append(f"the prefill ({p} tokens) does not go past the window W = {w}: window errors show in "
                         f"decoding only, and a buffer overwritten within a chunk cannot show at all")
        if w % chunk == 0 and chunk < p:
            notes.append(f"chunk {chunk} divides W = {w}: chunk boundaries coincide with window boundaries, so a "
                         f"buffer written before it is read can look like a window error")
    else:
        notes.append(f"full attention: no window; the run stays within the capacity C = {capacity} "
                     f"(positions 0-{total - 1})")
    if chunk >= p and p > 1:
        notes.append(f"the prefill is a single call of {p} tokens (chunk {chunk}): chunk boundaries are not tested")

    calls = [Call(s, min(chunk, p - s), "prefill") for s in range(0, p, chunk)]
    calls += [Call(p + i, 1, "decode") for i in range(steps)]
    return Schedule(window=window, capacity=capacity, chunk=chunk, prompt_ids=list(prompt_ids),
                    steps=steps, calls=calls, notes=notes)
