"""TensorRT backend: run a serialized engine of a ``tensorrt`` export, KV buffers updated in place on the GPU.

The engine is built by :mod:`mtx.exporter.tensorrt_engine`; TensorRT facts and plugin loading are in
:mod:`mtx.tensorrt`. The mtx plugins alias ``present_*`` to ``past_*`` (docs/ops.md §2, §4), so each
state's buffers are bound as both. (Where TensorRT does not honour the aliasing, the attention plugin
copies past -> present before its update and logs one warning: docs/ops.md §4 gives the cost.) Each
state owns its own execution context, so sessions on different threads run the engine concurrently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtx.errors import UsageError
from mtx.manifest import Manifest
from mtx.runtime.backends import Backend, layer_rows

if TYPE_CHECKING:
    import torch


def _torch_dtype(trt, t):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool, trt.int8: torch.int8}
    return table[t]


def aliased_input(output_name: str) -> str | None:
    """The input whose memory an output shares: present_key.{l} -> past_key.{l}, likewise values."""
    for out, inp in (("present_key", "past_key"), ("present_value", "past_value")):
        if output_name.startswith(out):
            return inp + output_name[len(out):]
    return None


class TrtRunner:
    """Run a serialized engine on torch CUDA tensors (device buffers, no host copies).

    ``run(inputs)`` binds every input tensor, allocates the outputs it is not given, and binds each
    ``present_*`` output to its ``past_*`` input when the caller passes no buffer for it — the
    in-place KV update of docs/ops.md §4 (``tensorrt`` target).
    """

    def __init__(self, engine_path: str | os.PathLike, device: str | int = "cuda") -> None:
        import torch

        from mtx import tensorrt as mtrt

        mtrt.load_plugins()
        trt = mtrt.import_tensorrt()
        self._trt = trt
        self.device = torch.device(device)
        self.runtime = trt.Runtime(mtrt.logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise mtrt.TensorRTError(f"TensorRT could not deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        if self.context is None:  # e.g. a plugin could not load its kernels for this GPU (see the log)
            raise mtrt.TensorRTError(f"TensorRT could not create an execution context for {engine_path}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def new_context(self) -> Any:
        """Another execution context of the same engine (one per concurrent caller)."""
        return self.engine.create_execution_context()

    def run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor] | None = None,
            stream: torch.cuda.Stream | None = None, context: Any = None) -> dict[str, torch.Tensor]:
        """Execute once; returns all outputs (present_* are the past_* tensors, updated in place).

        ``context`` (from :meth:`new_context`) lets several threads run the engine at once.
        """
        import torch

        from mtx import tensorrt as mtrt

        ctx = context if context is not None else self.context
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise UsageError(f"engine inputs missing: {', '.join(sorted(missing))}")
        for name in self.input_names:
            t = inputs[name]
            if not t.is_cuda or not t.is_contiguous():
                raise UsageError(f"input {name} must be a contiguous CUDA tensor")
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        result: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            if outputs is not None and name in outputs:
                t = outputs[name]
            elif aliased_input(name) in inputs:
                t = inputs[aliased_input(name)]
            else:
                shape = tuple(ctx.get_tensor_shape(name))
                t = torch.empty(shape, dtype=_torch_dtype(self._trt, self.engine.get_tensor_dtype(name)),
                                device=self.device)
            ctx.set_tensor_address(name, t.data_ptr())
            result[name] = t
        stream = stream or torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise mtrt.TensorRTError("TensorRT execution failed (see the log above)")
        return result


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
        self.kv_plan = manifest.kv_plan
        self.max_batch = min(max_batch or manifest.max_batch, manifest.max_batch)
        self.dtype = getattr(torch, manifest.dtype)
        self.device = torch.device(device)
        if not manifest.engine:
            raise UsageError(f"{root}: the export has no TensorRT engine ({manifest.engine_status})")
        self.runner = TrtRunner(root / manifest.engine, device=self.device)

    def new_state(self, batch: int) -> TrtKV:
        import torch

        if batch > self.max_batch:
            raise UsageError(f"batch {batch} exceeds the engine's maximum batch {self.max_batch}")
        shapes = [(batch, self.config.num_kv_heads, c, self.config.head_dim) for c in self.kv_plan.capacities]
        return TrtKV([torch.zeros(s, dtype=self.dtype, device=self.device) for s in shapes],
                     [torch.zeros(s, dtype=self.dtype, device=self.device) for s in shapes],
                     self.runner.new_context())

    def state_nbytes(self, state: TrtKV) -> int:
        return state.nbytes()

    def row_buffers(self, state: TrtKV, row: int) -> list[Any]:
        return layer_rows(state.keys, state.values, row)

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
