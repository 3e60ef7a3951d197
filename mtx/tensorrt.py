"""TensorRT: load the mtx plugins, build an engine from an exported ONNX, run an engine.

The plugin library ``libmtx_trt_plugins.so`` (plugins/tensorrt, built by ``cmake -S plugins
-DTensorRT_ROOT=...``) registers ``SlidingWindowGQA`` and ``MoE`` (namespace ``mtx``, version
``"1"``): the TensorRT ONNX parser maps the graph's mtx nodes to them. It is found through the
environment variable ``MTX_TRT_PLUGIN_LIB`` (path of the .so), else ``MTX_PLUGIN_BUILD_DIR`` (a CMake
build folder of plugins/), else ``build/plugins`` in this repository.

The KV buffers are updated in place (docs/ops.md §2, §4 ``tensorrt`` target): the plugin declares
present_* aliased to past_* (IPluginV3OneBuildV2, builder preview feature ALIASED_PLUGIN_IO_10_03,
enabled by :func:`build_engine`), and :class:`TrtRunner` binds each ``present_*`` output to the
memory of its ``past_*`` input.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtx.errors import MtxError, UsageError

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
PLUGIN_LIB_NAME = "libmtx_trt_plugins.so"
MIN_TENSORRT = (10, 3)
DTYPES = ("float32", "float16", "bfloat16")

_loaded: dict[str, Any] = {}


class TensorRTError(MtxError):
    """TensorRT is missing, or an engine could not be built or run."""


def plugin_library_path() -> Path | None:
    """The plugin library to load, or None if none is found (see the module docstring)."""
    env = os.environ.get("MTX_TRT_PLUGIN_LIB")
    if env:
        return Path(env) if Path(env).is_file() else None
    dirs = [Path(os.environ["MTX_PLUGIN_BUILD_DIR"])] if os.environ.get("MTX_PLUGIN_BUILD_DIR") else []
    dirs.append(REPO / "build" / "plugins")
    for d in dirs:
        for cand in (d / "tensorrt" / PLUGIN_LIB_NAME, d / PLUGIN_LIB_NAME):
            if cand.is_file():
                return cand
    return None


def _import_tensorrt():
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:  # also covers a tensorrt wheel whose libnvinfer cannot be loaded
        raise TensorRTError(f"the python package tensorrt cannot be imported ({e})") from e


def _version(trt) -> tuple[int, int]:
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    return major, minor


def available() -> tuple[bool, str]:
    """(True, description) if engines can be built here: ``tensorrt`` >= 10.3 importable and the plugin
    library found; else (False, the reason)."""
    try:
        trt = _import_tensorrt()
    except TensorRTError as e:
        return False, str(e)
    if _version(trt) < MIN_TENSORRT:
        return False, f"tensorrt {trt.__version__} is too old: the mtx plugins need >= 10.3"
    lib = plugin_library_path()
    if lib is None:
        return False, (f"{PLUGIN_LIB_NAME} not found: build plugins/ with -DTensorRT_ROOT=... into build/plugins, "
                       "or set MTX_TRT_PLUGIN_LIB / MTX_PLUGIN_BUILD_DIR")
    return True, f"tensorrt {trt.__version__}, plugins {lib}"


def _logger(trt):
    if "logger" not in _loaded:
        _loaded["logger"] = trt.Logger(trt.Logger.WARNING)
    return _loaded["logger"]


def load_plugins() -> Path:
    """Load libmtx_trt_plugins.so into TensorRT's plugin registry (once per process); returns its path."""
    ok, why = available()
    if not ok:
        raise TensorRTError(why)
    trt = _import_tensorrt()
    lib = plugin_library_path()
    assert lib is not None
    key = str(lib.resolve())
    if _loaded.get("library") != key:
        handle = trt.get_plugin_registry().load_library(key)
        if handle is None:
            raise TensorRTError(f"TensorRT could not load {key} (or its plugins are already registered)")
        _loaded["library"], _loaded["handle"] = key, handle
    registry = trt.get_plugin_registry()
    for name in ("SlidingWindowGQA", "MoE"):
        if registry.get_creator(name, "1", "mtx") is None:
            raise TensorRTError(f"{key} did not register the plugin mtx::{name} version 1")
    return lib


def _profile_shape(name: str, dims: Sequence[int], which: int, batch: Sequence[int], seq: Sequence[int],
                   capacity: Sequence[int] | None) -> tuple[int, ...]:
    """Dims of input ``name`` for profile point ``which`` (0 min, 1 opt, 2 max): docs/ops.md §4 axes."""
    out = []
    for axis, d in enumerate(dims):
        if d >= 0:
            out.append(d)
        elif axis == 0:
            out.append(batch[which])
        elif axis == 1 and name == "input_ids":
            out.append(seq[which])
        elif axis == 2 and name.startswith(("past_key", "past_value")) and capacity is not None:
            out.append(capacity[which])
        else:
            raise UsageError(f"input {name} has a dynamic axis {axis} that build_engine does not know how to size")
    return tuple(out)


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, dtype: str,
                 batch: Sequence[int] = (1, 1, 8), seq: Sequence[int] = (1, 1, 512),
                 capacity: Sequence[int] | None = None, workspace: int | None = None,
                 shapes: Mapping[str, Sequence[Sequence[int]]] | None = None) -> Path:
    """Parse an exported model (docs/ops.md §4) with the TensorRT ONNX parser and serialize an engine.

    ``batch``/``seq`` are (min, opt, max) of the dynamic ``batch`` and ``seq`` axes; ``capacity`` only
    if the KV capacity axis was left dynamic. ``dtype`` is the model dtype T: the network is built
    strongly typed from the ONNX types, and T must match them. ``workspace`` caps the builder's
    workspace pool (bytes). The mtx plugins update the KV buffers in place. Running the engine needs
    the plugin library loaded (:class:`TrtRunner` does it; trtexec: ``--dynamicPlugins``).
    ``shapes`` gives (min, opt, max) dims per input name explicitly (graphs other than §4's).
    """
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    load_plugins()
    trt = _import_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
    want = {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16}[dtype]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name.startswith("past_key") and t.dtype != want:
            raise UsageError(f"{onnx_path}: {t.name} is {t.dtype}, not {dtype}: export the model in {dtype}")
        if shapes is not None and t.name in shapes:
            points = [tuple(p) for p in shapes[t.name]]
        else:
            points = [_profile_shape(t.name, tuple(t.shape), w, batch, seq, capacity) for w in range(3)]
        profile.set_shape(t.name, *points)
    config.add_optimization_profile(profile)
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    out = Path(engine_path)
    out.write_bytes(bytes(blob))
    return out


def _torch_dtype(trt, t):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool, trt.int8: torch.int8}
    return table[t]


class TrtRunner:
    """Run a serialized engine on torch CUDA tensors (device buffers, no host copies).

    ``run(inputs)`` binds every input tensor, allocates the outputs it is not given, and binds each
    ``present_*`` output to its ``past_*`` input when the caller passes no buffer for it — the
    in-place KV update of docs/ops.md §4 (``tensorrt`` target).
    """

    def __init__(self, engine_path: str | os.PathLike, device: str | int = "cuda") -> None:
        import torch

        load_plugins()
        trt = _import_tensorrt()
        self._trt = trt
        self.device = torch.device(device)
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise TensorRTError(f"TensorRT could not deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    @staticmethod
    def aliased_input(output_name: str) -> str | None:
        """The input whose memory an output shares: present_key.{l} -> past_key.{l}, likewise values."""
        for out, inp in (("present_key", "past_key"), ("present_value", "past_value")):
            if output_name.startswith(out):
                return inp + output_name[len(out):]
        return None

    def new_context(self) -> Any:
        """Another execution context of the same engine (one per concurrent caller)."""
        return self.engine.create_execution_context()

    def run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor] | None = None,
            stream: torch.cuda.Stream | None = None, context: Any = None) -> dict[str, torch.Tensor]:
        """Execute once; returns all outputs (present_* are the past_* tensors, updated in place).

        ``context`` (from :meth:`new_context`) lets several threads run the engine at once.
        """
        import torch

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
            elif self.aliased_input(name) in inputs:
                t = inputs[self.aliased_input(name)]
            else:
                shape = tuple(ctx.get_tensor_shape(name))
                t = torch.empty(shape, dtype=_torch_dtype(self._trt, self.engine.get_tensor_dtype(name)),
                                device=self.device)
            ctx.set_tensor_address(name, t.data_ptr())
            result[name] = t
        stream = stream or torch.cuda.current_stream(self.device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise TensorRTError("TensorRT execution failed (see the log above)")
        return result
