"""Export step: build a TensorRT engine from an exported model.onnx with Polygraphy's TensorRT loaders.

``NetworkFromOnnxPath`` parses the graph (strongly typed: T comes from the ONNX types) after
:func:`mtx.tensorrt.load_plugins` has registered the mtx plugins, ``CreateConfig`` holds the
optimization profile, the preview feature for aliased plugin I/O and the workspace limit, and
``EngineBytesFromNetwork`` builds the serialized engine. Between parsing and building, the network
must hold exactly one mtx plugin layer per mtx node of the ONNX graph (:func:`check_plugin_layers`):
anything else means the parser inlined the nodes' standard-op function bodies, and the build fails
saying so. Running engines: :mod:`mtx.runtime.trt_backend`. TensorRT facts: :mod:`mtx.tensorrt`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mtx import tensorrt as mtrt
from mtx.errors import UsageError
from mtx.names import DOMAIN


def mtx_nodes(onnx_path: str | os.PathLike) -> Counter[str]:
    """Op types of the mtx-domain nodes of the main graph of ``onnx_path`` (weights are not read)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node if n.domain == DOMAIN)


def check_plugin_layers(expected: Mapping[str, int], found: Iterable[tuple[str, str | None]],
                        onnx_path: str | os.PathLike) -> None:
    """Fail unless ``found`` holds exactly one plugin layer per mtx node of ``expected``.

    ``expected``: op type -> node count (:func:`mtx_nodes`). ``found``: (layer type, plugin name or
    None when the name cannot be read) for every plugin layer of the parsed network.
    """
    layers = list(found)
    want = sum(expected.values())
    named = Counter(name for _, name in layers if name is not None)
    unnamed = sum(1 for _, name in layers if name is None)
    ok = len(layers) == want and set(named) <= set(expected) and all(named[op] <= expected[op] for op in named)
    if not ok:
        nodes = ", ".join(f"{n} {op}" for op, n in sorted(expected.items())) or "no mtx nodes"
        got = ", ".join(f"{n} {op}" for op, n in sorted(named.items()))
        got = (got + (", " if got and unnamed else "") + (f"{unnamed} unnamed" if unnamed else "")) or "none"
        raise mtrt.TensorRTError(
            f"{onnx_path}: the TensorRT network has plugin layers {got}, but the graph has {nodes}: the ONNX parser "
            f"did not map every mtx node to the mtx plugins (it inlines the nodes' function bodies when the "
            f"plugins are not registered or TensorRT is older than {'.'.join(map(str, mtrt.MIN_TENSORRT))})")


def _plugin_layers(trt, network) -> list[tuple[str, str | None]]:
    """(layer type, plugin name) of every plugin layer of a parsed network."""
    out = []
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3") if hasattr(trt.LayerType, k)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in kinds:
            continue
        name = None
        if hasattr(trt.LayerType, "PLUGIN_V3") and layer.type == trt.LayerType.PLUGIN_V3:
            try:  # the bindings expose the plugin's name on some releases only; otherwise it counts unnamed
                layer.__class__ = trt.IPluginV3Layer
                core = layer.plugin.get_capability_interface(trt.PluginCapabilityType.CORE)
                plugin, namespace = getattr(core, "plugin_name", None), getattr(core, "plugin_namespace", None)
                if plugin is not None:
                    name = plugin if namespace == mtrt.PLUGIN_NAMESPACE else f"other:{namespace}::{plugin}"
            except Exception:  # noqa: BLE001
                name = None
        else:
            name = "other:plugin_v2"
        out.append((str(layer.type), name))
    return out


def profile_shape(name: str, dims: Sequence[int], which: int, batch: Sequence[int], seq: Sequence[int],
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
    """Parse an exported model (docs/ops.md §4) and serialize an engine to ``engine_path``.

    ``batch``/``seq`` are (min, opt, max) of the dynamic ``batch`` and ``seq`` axes; ``capacity`` only
    if the KV capacity axis was left dynamic. ``dtype`` is the model dtype T: the network is built
    strongly typed from the ONNX types, and T must match them. ``workspace`` caps the builder's
    workspace pool (bytes). ``shapes`` gives (min, opt, max) dims per input name explicitly (graphs
    other than §4's). Running the engine needs the plugin library loaded (the runtime backend does
    it; trtexec: ``--dynamicPlugins``). The file is written only when the build succeeded.
    """
    if dtype not in mtrt.DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(mtrt.DTYPES)}, got {dtype}")
    mtrt.load_plugins()
    trt = mtrt.import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    mtrt.logger(trt)  # TensorRT's own messages at WARNING, once per process
    try:
        builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
    except Exception as e:  # noqa: BLE001  (Polygraphy reports parser errors as PolygraphyException)
        raise mtrt.TensorRTError(f"TensorRT could not parse {onnx_path}: {e}") from e
    check_plugin_layers(mtx_nodes(onnx_path), _plugin_layers(trt, network), onnx_path)
    want = {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16}[dtype]
    profile = Profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name.startswith("past_key") and t.dtype != want:
            raise UsageError(f"{onnx_path}: {t.name} is {t.dtype}, not {dtype}: export the model in {dtype}")
        if shapes is not None and t.name in shapes:
            points = [tuple(p) for p in shapes[t.name]]
        else:
            points = [profile_shape(t.name, tuple(t.shape), w, batch, seq, capacity) for w in range(3)]
        profile.add(t.name, *points)
    pools = {trt.MemoryPoolType.WORKSPACE: int(workspace)} if workspace is not None else None
    config = CreateConfig(profiles=[profile], preview_features=[trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03],
                          memory_pool_limits=pools)
    try:
        blob = EngineBytesFromNetwork((builder, network, parser), config=config)()
    except Exception as e:  # noqa: BLE001
        raise mtrt.TensorRTError(f"TensorRT failed to build an engine from {onnx_path}: {e}") from e
    out = Path(engine_path)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_bytes(bytes(blob))
    tmp.replace(out)
    return out
