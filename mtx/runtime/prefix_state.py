"""A row's KV state at a position, detached from any buffer: what a prefix cache hit or a saved prefix
state seeds a row with (docs/ops.md §1 rules 10-11).

Only the live positions ``[first, position)`` are held (``first = max(0, position - W)``), in position
order, whatever the layout the row uses: a backend writes them where its layout puts them
(:func:`mtx.rolling_kv.slot_at`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PrefixState:
    """``tokens``: the ids at positions ``0 .. position-1``; ``keys``/``values``: [L, Hkv, n, D] in the
    export dtype, the live positions ``first .. position-1`` in order (``n = position - first``)."""

    tokens: tuple[int, ...]
    first: int
    keys: np.ndarray
    values: np.ndarray

    @property
    def position(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)
