"""The names mtx accepts, one list of each: export targets, model dtypes, runtime backends, and the
names of the mtx ops in ONNX and of their TensorRT plugins.

CLI choices, export options, the manifest's validation and the runtime all read these lists, and
the dtype tables below are the only mapping from a dtype name to torch, numpy or ONNX types.
Importing this module is cheap (torch and onnx are imported inside the functions that need them).
"""

from __future__ import annotations

from typing import Any

#: ``mtx export --target``: what the graph is shaped for (docs/ops.md §5).
TARGETS = ("onnxruntime", "onnx", "tensorrt")
#: Model dtype T of an export (activations, weights, KV buffers).
DTYPES = ("float32", "float16", "bfloat16")
#: Engines that run an export (``torch``: the PyTorch reference of its checkpoint).
BACKENDS = ("onnxruntime", "tensorrt", "torch")

#: Default-domain opset of the exported graph and of the mtx ops' function bodies (they must agree).
OPSET = 18
#: ONNX domain of the mtx ops and its version (docs/ops.md).
DOMAIN = "mtx"
DOMAIN_VERSION = 1
#: op_type of the attention op (``mtx::SlidingWindowGQA``, docs/ops.md §2), also its function and
#: TensorRT plugin name.
ATTENTION_OP = "SlidingWindowGQA"
#: op_type of the mixture-of-experts op (``mtx::MoE``, docs/ops.md §3), also its function and
#: TensorRT plugin name.
MOE_OP = "MoE"
#: plugin_version / plugin_namespace attributes written on the mtx nodes, under which the TensorRT
#: plugin library registers its plugins (mtx.tensorrt).
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "mtx"

#: onnx.TensorProto element types of the tensor dtypes an export's interface uses.
ONNX_ELEMENT_TYPES: dict[str, int] = {"float32": 1, "float16": 10, "bfloat16": 16, "int32": 6, "int64": 7}


def torch_dtype(name: str) -> Any:
    """The torch dtype of a dtype name (one of :data:`DTYPES`)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def numpy_dtype(name: str) -> Any:
    """The numpy dtype of a dtype name or ``int64``; bfloat16 is ml_dtypes' (numpy has none)."""
    import numpy as np

    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}[name])


def onnx_dtype_name(element_type: int) -> str:
    """Inverse of :data:`ONNX_ELEMENT_TYPES`."""
    return {v: k for k, v in ONNX_ELEMENT_TYPES.items()}[int(element_type)]
