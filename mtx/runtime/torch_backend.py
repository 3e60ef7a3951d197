"""The PyTorch reference as a runtime :class:`~mtx.runtime.backends.Backend` (imports torch)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from mtx.rolling_kv import KVPlan
from mtx.runtime.backends import Backend, layer_rows


class TorchBackend(Backend):
    """The PyTorch reference (eager, KV updated in place); same contract as the exported graph."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, capacity: int | KVPlan | None = None, max_batch: int = 8,
                 device: str | torch.device = "cpu") -> None:
        self.model = model
        self.config = model.cfg
        self.device = torch.device(device)
        self.kv_plan = model.kv_plan(capacity)
        self._requested = capacity
        self.max_batch = max_batch
        self.dtype = model.embed.weight.dtype
        # One call at a time: torch's intra-op pool already uses every thread it was given, and calls
        # from several threads at once oversubscribe it (measured: 0.3x the throughput under 8 threads).
        self._run_lock = threading.Lock()

    @classmethod
    def from_checkpoint(cls, ckpt: Any, dtype: str, *, capacity: int | KVPlan | None = None, max_batch: int = 8,
                        threads: int | None = None, device: str | None = None,
                        quantization: Any = None) -> TorchBackend:
        """The reference model of checkpoint folder ``ckpt`` in ``dtype`` on ``device`` (default cpu);
        with ``quantization`` (an export's manifest entry) its fake-quant weights (docs/ops.md §7)."""
        from mtx.models import build_model

        if threads:
            torch.set_num_threads(threads)
        device = device or "cpu"
        model = build_model(ckpt, dtype, device=device, quantization=quantization)
        return cls(model, capacity=capacity, max_batch=max_batch, device=device)

    def new_state(self, batch: int) -> Any:
        return self.model.new_kv(batch, self._requested, self.dtype, self.device)

    def state_nbytes(self, state: Any) -> int:
        return state.nbytes()

    def row_buffers(self, state: Any, row: int) -> list[Any]:
        return layer_rows(state.keys, state.values, row)

    def run(self, state: Any, rows: slice, input_ids: np.ndarray, start_pos: np.ndarray,
            last_only: bool) -> np.ndarray:
        """Rows of a multi-row call run one at a time: torch's CPU matmuls block by the row count, so a
        row's float32 result would otherwise depend on the rows beside it (1e-6 differences, measured).
        The reference keeps each row bit-identical to the row run alone."""
        if rows.stop - rows.start > 1:
            return np.concatenate([self._run(state, slice(r, r + 1), input_ids[i:i + 1], start_pos[i:i + 1],
                                             last_only) for i, r in enumerate(range(rows.start, rows.stop))])
        return self._run(state, rows, input_ids, start_pos, last_only)

    def _run(self, state: Any, rows: slice, input_ids: np.ndarray, start_pos: np.ndarray,
             last_only: bool) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.device)
        start = torch.from_numpy(np.ascontiguousarray(start_pos, dtype=np.int64)).to(self.device)
        with self._run_lock, torch.no_grad():
            logits = self.model(ids, start, state.rows(rows))
            if last_only:
                logits = logits[:, -1:]
            return logits.float().cpu().numpy()
