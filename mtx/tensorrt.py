"""TensorRT facts and the plugin library, shared by the engine build and the engine run.

The one statement of what the TensorRT side needs (:data:`MIN_TENSORRT`, the plugin names, namespace
and version, :data:`DTYPES`); plugins/tensorrt/CMakeLists.txt checks the same minimum for the headers.
The engine is built by :mod:`mtx.exporter.tensorrt_engine` and run by :mod:`mtx.runtime.trt_backend`.

The plugin library ``libmtx_trt_plugins.so`` (plugins/tensorrt, built by ``cmake -S plugins
-DTensorRT_ROOT=...``) registers ``SlidingWindowGQA`` and ``MoE`` (namespace ``mtx``, version
``"1"``): the TensorRT ONNX parser maps the graph's mtx nodes to them. It is found through the
environment variable ``MTX_TRT_PLUGIN_LIB`` (path of the .so), else ``MTX_PLUGIN_BUILD_DIR`` (a CMake
build folder of plugins/), else ``build/plugins`` in this repository.

Minimum TensorRT 10.7: from 10.7 the ONNX parser maps a node to a registered plugin even when the
model defines the op as a model-local function (the portable bodies the export keeps); 10.3–10.6
inline the bodies instead, so the plugins would never run and the engine would read and write the
KV buffers as separate tensors that the runtime binds to one memory. The engine build also checks,
after parsing, that the network holds one plugin layer per mtx node.

The KV buffers are updated in place (docs/ops.md §2, §4 ``tensorrt`` target): the plugin declares
present_* aliased to past_* (IPluginV3OneBuildV2, builder preview feature ALIASED_PLUGIN_IO_10_03),
and the runtime binds each ``present_*`` output to the memory of its ``past_*`` input.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from mtx import names
from mtx.errors import MtxError
from mtx.names import ATTENTION_OP, MOE_OP, PLUGIN_NAMESPACE, PLUGIN_VERSION

REPO = Path(__file__).resolve().parents[1]
PLUGIN_LIB_NAME = "libmtx_trt_plugins.so"
#: Oldest TensorRT whose ONNX parser prefers our plugins to the nodes' function bodies (see above).
MIN_TENSORRT = (10, 7)
#: Model dtypes T an engine can be built for.
DTYPES = names.DTYPES  # the plugins take every model dtype
#: The plugins the library registers: the mtx ops' ONNX op types, with the plugin_namespace and
#: plugin_version attributes the exporter writes on their nodes (mtx.names).
PLUGIN_NAMES = (ATTENTION_OP, MOE_OP)

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


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTError` saying why it cannot be imported."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:  # also covers a tensorrt wheel whose libnvinfer cannot be loaded
        raise TensorRTError(f"the python package tensorrt cannot be imported ({e})") from e


def _version(trt) -> tuple[int, int]:
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    return major, minor


def available() -> tuple[bool, str]:
    """(True, description) if engines can be built here: ``tensorrt`` >= :data:`MIN_TENSORRT` importable
    and the plugin library found; else (False, the reason)."""
    try:
        trt = import_tensorrt()
    except TensorRTError as e:
        return False, str(e)
    if _version(trt) < MIN_TENSORRT:
        need = ".".join(map(str, MIN_TENSORRT))
        return False, (f"tensorrt {trt.__version__} is too old: the mtx plugins need >= {need} (older ONNX parsers "
                       "inline the mtx ops' function bodies instead of using the plugins)")
    lib = plugin_library_path()
    if lib is None:
        return False, (f"{PLUGIN_LIB_NAME} not found: build plugins/ with -DTensorRT_ROOT=... into build/plugins, "
                       "or set MTX_TRT_PLUGIN_LIB / MTX_PLUGIN_BUILD_DIR")
    return True, f"tensorrt {trt.__version__}, plugins {lib}"


def logger(trt):
    """The one TensorRT logger of this process (warnings and errors)."""
    if "logger" not in _loaded:
        _loaded["logger"] = trt.Logger(trt.Logger.WARNING)
    return _loaded["logger"]


def load_plugins() -> Path:
    """Load libmtx_trt_plugins.so into TensorRT's plugin registry (once per process); returns its path."""
    ok, why = available()
    if not ok:
        raise TensorRTError(why)
    trt = import_tensorrt()
    lib = plugin_library_path()
    assert lib is not None
    key = str(lib.resolve())
    if _loaded.get("library") != key:
        handle = trt.get_plugin_registry().load_library(key)
        if handle is None:
            raise TensorRTError(f"TensorRT could not load {key} (or its plugins are already registered)")
        _loaded["library"], _loaded["handle"] = key, handle
    registry = trt.get_plugin_registry()
    for name in PLUGIN_NAMES:
        if registry.get_creator(name, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            raise TensorRTError(f"{key} did not register the plugin {PLUGIN_NAMESPACE}::{name} version {PLUGIN_VERSION}")
    return lib
