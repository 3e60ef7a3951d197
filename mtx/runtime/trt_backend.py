"""TensorRT backend: a serialized engine of a ``tensorrt`` export, KV buffers updated in place on the GPU.

The mtx plugins alias ``present_*`` to ``past_*`` (docs/ops.md §2, §4), so each state's buffers are
bound as both and never copied. Each state owns its own execution context, so sessions on different
threads run the engine concurrently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtx.errors import UsageError
from mtx.manifest import Manifest
from mtx.runtime.backends import Backend


@dataclass
class TrtKV:
    """Per-layer key/value buffers [batch, Hkv, C, D] on the GPU, and this state's execution context."""

    keys: list[Any]
    values: list[Any]
    context: Any

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class TrtBackend(Backend):
    name = "tensorrt"

    def __init__(self, root: Path, manifest: Manifest, max_batch: int | None = None,
                 device: str = "cuda") -> None:
        import torch

        from mtx import tensorrt

        ok, why = tensorrt.available()
        if not ok:
            raise UsageError(f"{root}: cannot run the TensorRT engine: {why}")
        if not torch.cuda.is_available():
            raise UsageError(f"{root}: the TensorRT backend needs a CUDA GPU")
        self.config = manifest.model_config
        self.capacity = manifest.capacity
        self.max_batch = min(max_batch or manifest.max_batch, manifest.max_batch)
        self.dtype = getattr(torch, manifest.dtype)
        self.device = torch.device(device)
        self.runner = tensorrt.TrtRunner(root / manifest.engine, device=self.device)

    def new_state(self, batch: int) -> TrtKV:
        import torch

        if batch > self.max_batch:
            raise UsageError(f"batch {batch} exceeds the engine's maximum batch {self.max_batch}")
        shape = (batch, self.config.num_kv_heads, self.capacity, self.config.head_dim)
        n = self.config.num_layers
        return TrtKV([torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
                     [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)],
                     self.runner.new_context())

    def state_nbytes(self, state: TrtKV) -> int:
        return state.nbytes()

    def run(self, state: TrtKV, rows: slice, input_ids: np.ndarray, start_pos: np.ndarray,
            last_only: bool) -> np.ndarray:
        import torch

        feeds = {"input_ids": torch.as_tensor(np.ascontiguousarray(input_ids, dtype=np.int64), device=self.device),
                 "start_pos": torch.as_tensor(np.ascontiguousarray(start_pos, dtype=np.int64), device=self.device)}
        for l in range(self.config.num_layers):
            feeds[f"past_key.{l}"] = state.keys[l][rows]  # a row range of a contiguous buffer is contiguous
            feeds[f"past_value.{l}"] = state.values[l][rows]
        logits = self.runner.run(feeds, context=state.context)["logits"]
        if last_only:
            logits = logits[:, -1:]
        return logits.float().cpu().numpy()
