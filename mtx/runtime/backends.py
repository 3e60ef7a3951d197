"""Engines behind a :class:`mtx.runtime.Generator`: each runs one call of the exported graph contract.

A backend owns the model (a torch module, an ONNX Runtime session or a TensorRT engine) and makes
KV states: the rolling buffers of up to ``max_batch`` rows, allocated once, layer ``l`` at capacity ``C_l``
(:attr:`Backend.kv_plan`). A call
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
from mtx.errors import UsageError


class Backend(ABC):
    """One engine: layer l's KV rows hold ``kv_plan.capacities[l]`` slots, at most ``max_batch`` rows per state."""

    name: str
    config: ModelConfig
    #: Each layer's window, capacity and layout (docs/ops.md §1 "Per-layer windows").
    kv_plan: rolling_kv.KVPlan
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
    def per_layer(self) -> bool:
        """Whether the layers differ in window, capacity or layout (rules 10-12 then do not apply)."""
        return not self.kv_plan.uniform

    @property
    def window(self) -> int | None:
        """The window of every layer (None: full attention); UsageError where layers differ."""
        return self.kv_plan.window

    @property
    def capacity(self) -> int:
        """C of every layer; UsageError where layers differ."""
        return self.kv_plan.capacity

    @property
    def kv_layout(self) -> str:
        """Where a position's key sits in a row (docs/ops.md §5 ``kv.layout``; §1 rule 10); UsageError
        where layers differ."""
        return self.kv_plan.layout

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

    def row_buffers(self, state: Any, row: int) -> list[Any]:
        """The 2L buffers [Hkv, C, D] holding ``row`` of ``state`` (keys of layer l at 2l, values at 2l+1):
        writable views (numpy arrays, or torch tensors), or :class:`HostRow` for device memory."""
        raise UsageError(f"the {self.name} backend cannot read or write a row's KV positions")

    def read_positions(self, state: Any, row: int, at: int, positions: range) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values [L, Hkv, n, D] (numpy, export dtype; float32 for bfloat16) of ``positions``,
        all held by ``row`` at position ``at``, in position order (docs/ops.md §1 rule 10)."""
        slots = np.asarray(rolling_kv.slots_at(self.kv_layout, positions, at, self.window, self.capacity),
                           dtype=np.int64)
        bufs = self.row_buffers(state, row)
        parts = [_to_numpy(b[:, slots]) for b in bufs]
        return np.stack(parts[0::2]), np.stack(parts[1::2])

    def write_positions(self, state: Any, row: int, at: int, first: int, keys: np.ndarray,
                        values: np.ndarray) -> None:
        """Write keys/values [L, Hkv, n, D] of positions ``first .. first+n-1`` where ``row``'s layout holds
        them at position ``at`` (rule 10). Other slots are left as they are."""
        positions = range(first, first + keys.shape[2])
        slots = np.asarray(rolling_kv.slots_at(self.kv_layout, positions, at, self.window, self.capacity),
                           dtype=np.int64)
        bufs = self.row_buffers(state, row)
        for i, b in enumerate(bufs):
            src = (keys if i % 2 == 0 else values)[i // 2]
            _assign(b, slots, src)
        for b in bufs:
            if isinstance(b, HostRow):
                b.flush()

    def position_limit(self) -> int | None:
        """Positions a row may reach (prompt + generated tokens), or None where unbounded."""
        return self.kv_plan.context_limit(self.max_position)

    def check_positions(self, end_pos: int) -> None:
        """Raise a clear error if a row would run past what this engine can hold."""
        self.kv_plan.check_context(end_pos)
        if self.max_position is not None and end_pos > self.max_position:
            raise UsageError(f"position {end_pos} exceeds max_position {self.max_position} of this export "
                             f"(its RoPE tables); export it again with a larger max_position", params=("max_position",))


def layer_rows(keys: list[Any], values: list[Any], row: int) -> list[Any]:
    """:meth:`Backend.row_buffers` of a state holding per-layer key and value buffers [B, Hkv, C, D]:
    views of ``row``, keys of layer l at 2l, values at 2l+1."""
    return [buf[row] for pair in zip(keys, values) for buf in pair]


class HostRow:
    """A host copy of one row [Hkv, C, D] of a device buffer, written back by :meth:`flush`."""

    def __init__(self, host: np.ndarray, write_back: Any) -> None:
        self.host = host
        self._write_back = write_back
        self.dirty = False

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.host[index]

    def __setitem__(self, index: Any, value: np.ndarray) -> None:
        self.host[index] = value
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            self._write_back(self.host)
            self.dirty = False


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    import torch

    t = x.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _assign(buf: Any, slots: np.ndarray, src: np.ndarray) -> None:
    """``buf[:, slots] = src`` for a numpy array, a :class:`HostRow` or a torch tensor."""
    if isinstance(buf, (np.ndarray, HostRow)):
        buf[:, slots] = src
        return
    import torch

    if src.dtype.kind != "f" or src.dtype.itemsize not in (2, 4, 8):  # e.g. ml_dtypes.bfloat16 from a file
        src = src.astype(np.float32)  # exact: bfloat16 values are float32 values
    buf[:, torch.from_numpy(slots).to(buf.device)] = torch.from_numpy(np.ascontiguousarray(src)).to(buf.device,
                                                                                                    buf.dtype)
