"""Engines behind a :class:`mtx.runtime.Generator`: each runs one call of the exported graph contract.

A backend owns the model (a torch module, an ONNX Runtime session or a TensorRT engine) and makes
KV states: the rolling buffers of up to ``max_batch`` rows, allocated once at capacity ``C``. A call
``run(state, rows, input_ids, start_pos)`` feeds a chunk for a contiguous range of rows, reading and
updating their buffers in place (docs/ops.md §1 and §4). Backends are thread-safe: many states may be
used from many threads at once; one state is used by one thread at a time.

This module imports neither torch nor onnxruntime (the ONNX Runtime path runs without torch): the
engines live in :mod:`mtx.runtime.ort_backend`, :mod:`mtx.runtime.trt_backend` and
:mod:`mtx.runtime.torch_backend`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from mtx import rolling_kv
from mtx.config import ModelConfig


class Backend(ABC):
    """One engine: ``capacity`` C slots per KV row, at most ``max_batch`` rows per state."""

    name: str
    config: ModelConfig
    capacity: int
    max_batch: int
    max_position: int | None = None
    #: ``"first_call_only"``: a call with several rows and several tokens per row is allowed only when
    #: every row starts at position 0 (docs/ops.md §5 ``kv.multi_token_batch``); ``"any"``: always.
    multi_token_batch: str = "any"
    #: Whether a call may be run again on the same rows and positions with the same result, even after
    #: it failed part-way: true where a call writes only its positions' slots (``ring`` layout, or
    #: separate past/present), false for ONNX Runtime's ``ort_window`` cache, which a repeated call
    #: shifts a second time.
    rerun_safe: bool = True

    @property
    def window(self) -> int | None:
        return self.config.sliding_window

    @abstractmethod
    def new_state(self, batch: int) -> Any:
        """KV buffers for ``batch`` rows, allocated once, never reallocated."""

    @abstractmethod
    def state_nbytes(self, state: Any) -> int:
        """Bytes held by the KV buffers of ``state``."""

    @abstractmethod
    def run(self, state: Any, rows: slice, input_ids: np.ndarray, start_pos: np.ndarray,
            last_only: bool) -> np.ndarray:
        """Feed input_ids [b, S] (int64) at start_pos [b] for ``rows`` of ``state``.

        Returns float32 logits [b, S, V], or [b, 1, V] for the last token when ``last_only``.
        """

    def position_limit(self) -> int | None:
        """Positions a row may reach (prompt + generated tokens), or None where unbounded."""
        return rolling_kv.context_limit(self.window, self.capacity, self.max_position)

    def check_positions(self, end_pos: int) -> None:
        """Raise a clear error if a row would run past what this engine can hold."""
        rolling_kv.check_full_attention_context(end_pos, self.window, self.capacity)
        if self.max_position is not None and end_pos > self.max_position:
            from mtx.errors import UsageError
            raise UsageError(f"position {end_pos} exceeds max_position {self.max_position} of this export "
                             f"(its RoPE tables); export it again with a larger max_position", params=("max_position",))
