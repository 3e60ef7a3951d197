"""Integrity of an export at load: the model that loads is the model that was exported.

:func:`verify_export` runs on every :func:`mtx.load` of an export (``verify=False`` skips the hashes):

* the sha256 of every small file (graph, tokenizer, tooling) is recomputed each time;
* the weights (``weights``, ``checkpoint-weights``, ``engine``) are hashed once, in parallel, and the
  verified state (path, device, inode, size, mtime and ctime, digest) is recorded in
  ``$MTX_CACHE_DIR`` (default ``~/.cache/mtx``); a later load skips a file whose state is unchanged;
* the manifest is checked against the graph itself, in :func:`check_graph` (every field the graph
  determines: inputs, outputs, their dtypes and shapes, ``dtype``, the KV capacity, layers, vocabulary,
  op counts and domains, rotary table rows, ``layer_outputs``, quantised tensors, and the external data
  the graph references: inside the folder, listed under ``files``, long enough), so a tampered
  ``mtx.json`` or graph is one line, not an ONNX Runtime traceback.

External data may be a symlink to a file outside the folder (a deduplicated model store): the file is
listed in ``mtx.json``, whose sha256 pins its bytes; :func:`external_data_folder` says where ONNX
Runtime must then look for it.
"""

from __future__ import annotations

from collections.abc import Iterator

import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mtx.manifest import MANIFEST, FileEntry, Manifest, ManifestError, sha256_file
from mtx.names import ONNX_ELEMENT_TYPES

#: Roles whose files are large: hashed once per file state, not on every load.
LARGE_ROLES = ("weights", "checkpoint-weights", "engine")
ROPE_TABLES = ("rope_cos_cache", "rope_sin_cache")  # mtx.exporter.ort_lowering.ROPE_COS / ROPE_SIN


def cache_dir() -> Path:
    return Path(os.environ.get("MTX_CACHE_DIR") or Path.home() / ".cache" / "mtx")


def _state(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load_records(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _save_records(path: Path, records: dict[str, Any]) -> None:
    """Best effort (an unwritable cache only means hashing again next time); atomic rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".verified.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(records, f)
        os.replace(tmp, path)
    except OSError:
        pass


def verify_hashes(root: Path, manifest: Manifest, remember: bool = True) -> None:
    """Recompute the sha256 of the export's files (large ones once per state when ``remember``)."""
    record_file = cache_dir() / "verified.json"
    records = _load_records(record_file) if remember else {}
    todo: list[FileEntry] = []
    for entry in manifest.files:
        key = str((root / entry.path).resolve())
        rec = records.get(key)
        if remember and entry.role in LARGE_ROLES and isinstance(rec, dict) and rec.get("sha256") == entry.sha256 \
                and rec.get("state") == _state(root / entry.path):
            continue
        todo.append(entry)
    workers = min(len(todo), os.cpu_count() or 1) or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib releases the GIL on large blocks
        digests = list(pool.map(lambda e: sha256_file(root / e.path), todo))
    for entry, digest in zip(todo, digests):
        if digest != entry.sha256:
            raise ManifestError(f"{root / entry.path}: sha256 differs from {MANIFEST} (the file changed after "
                                f"export); export again, or load with verify=False to skip this check")
    if remember and any(e.role in LARGE_ROLES for e in todo):
        for entry in todo:
            if entry.role in LARGE_ROLES:
                records[str((root / entry.path).resolve())] = {"sha256": entry.sha256,
                                                              "state": _state(root / entry.path)}
        _save_records(record_file, records)


#: Op domains ONNX Runtime runs besides the model's own local functions ("" is ai.onnx).
ORT_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def read_graph(root: Path, manifest: Manifest) -> Any:
    """``root/model.onnx`` as an onnx.ModelProto without its external data; ManifestError if unreadable."""
    import onnx

    path = root / manifest.model
    try:
        return onnx.load(str(path), load_external_data=False)
    except RecursionError:
        raise ManifestError(f"{path}: not a readable ONNX model (nested too deeply)") from None
    except Exception as e:  # noqa: BLE001 - any parse failure is "not the exported graph"
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise ManifestError(f"{path}: not a readable ONNX model ({lines[0][:200]})") from None


def _nested_tensors(proto: Any) -> Iterator[tuple[str, Any]]:
    """(where, tensor) of every tensor outside the main graph's initializers that ONNX Runtime could load
    external data for: node attribute tensors (Constant values, ...), sparse initializers, and the
    initializers and nodes of subgraphs and model-local functions."""
    def in_nodes(nodes: Any, where: str) -> Iterator[tuple[str, Any]]:
        for node in nodes:
            for a in node.attribute:
                label = f"{where}node {node.name or node.op_type!r} attribute {a.name!r}"
                if a.HasField("t"):
                    yield label, a.t
                yield from ((label, t) for t in a.tensors)
                if a.HasField("sparse_tensor"):
                    yield label, a.sparse_tensor.values
                yield from ((label, st.values) for st in a.sparse_tensors)
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from in_graph(g, f"{label}: subgraph ")

    def in_graph(g: Any, where: str) -> Iterator[tuple[str, Any]]:
        if where:
            yield from ((f"{where}initializer {t.name!r}", t) for t in g.initializer)
        yield from ((f"{where}sparse initializer", st.values) for st in g.sparse_initializer)
        yield from in_nodes(g.node, where)

    yield from in_graph(proto.graph, "")
    for f in proto.functions:
        yield from in_nodes(f.node, f"function {f.name!r}: ")


def external_files(proto: Any, path: Path | str = "model.onnx") -> dict[str, list[tuple[str, int, int]]]:
    """Location -> [(initializer, offset, length)] of the graph's external data (offset -1: not a
    non-negative integer; length -1: not given). ManifestError if any tensor other than a main-graph
    initializer stores external data (mtx never writes one, and its bytes would escape the checks)."""
    for where, t in _nested_tensors(proto):
        if t.data_location == 1:
            raise ManifestError(f"{path}: {where} stores its data externally; only initializers of the main "
                                f"graph may (the export never writes another)")
    out: dict[str, list[tuple[str, int, int]]] = {}
    for t in proto.graph.initializer:
        if t.data_location != 1:  # onnx.TensorProto.EXTERNAL
            continue
        info = {e.key: e.value for e in t.external_data}
        offset = _non_negative(info.get("offset", "0"))
        length = _non_negative(info.get("length", "")) if "length" in info else -1
        if "length" in info and length < 0:
            offset = -1  # an unparsable length makes the entry as unusable as a bad offset
        out.setdefault(info.get("location", ""), []).append((t.name, offset, length))
    return out


def _non_negative(text: str) -> int:
    """``text`` as a non-negative decimal integer that fits int64 (as ONNX Runtime reads it), or -1."""
    value = int(text) if text.isascii() and text.isdigit() else -1
    return value if value < 1 << 63 else -1


def _tensor_bytes(t: Any) -> int | None:
    """Bytes of an initializer from its dims and element type, None for packed or unknown types."""
    import numpy as np
    import onnx

    try:
        item = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:  # noqa: BLE001 - int4, string and other types without a plain item size
        return None
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.STRING):
        return None
    n = 1
    for d in t.dims:
        n *= int(d)
    return n * item


def _check_external_data(root: Path, manifest: Manifest, proto: Any, origin: str) -> None:
    """Every external-data location is relative, inside the folder, listed under ``files`` (so its
    sha256 pins its bytes, also through a symlink), and long enough for every tensor stored in it."""
    path = root / manifest.model
    listed = {f.path: f for f in manifest.files}
    sizes = {t.name: _tensor_bytes(t) for t in proto.graph.initializer if t.data_location == 1}
    for location, tensors in external_files(proto, path).items():
        name = tensors[0][0]
        parts = Path(location).parts
        if not location or Path(location).is_absolute() or ".." in parts:
            raise ManifestError(f"{path}: initializer {name!r} has its data at {location!r}, outside the export "
                                f"folder (external data must be a relative path inside it)")
        key = Path(location).as_posix()
        if key not in listed:
            raise ManifestError(f"{path}: initializer {name!r} has its data in {location!r}, which {origin} "
                                f"does not list under files")
        file = root / key
        try:
            size = file.stat().st_size
        except OSError as e:
            raise ManifestError(f"{file}: external data of {name!r} cannot be read ({e.strerror})") from None
        for tensor, offset, length in tensors:
            if offset < 0:
                raise ManifestError(f"{path}: initializer {tensor!r} has an external-data offset or length that "
                                    f"is not a non-negative integer")
            need = length if length >= 0 else sizes.get(tensor)
            if need is not None and (need < 0 or offset + need > size):  # need < 0: a negative dimension
                raise ManifestError(f"{file}: {size} bytes, but initializer {tensor!r} is stored at bytes "
                                    f"{offset}..{offset + need} (the file is truncated or not this graph's)")


def external_data_folder(root: Path, proto: Any) -> tuple[Path, dict[str, str]] | None:
    """Where ONNX Runtime must read external data that is a symlink out of ``root``: the folder holding
    every resolved file and each location's path inside it; None when all resolve inside ``root``.

    ONNX Runtime refuses external data whose resolved path leaves the model's folder; an export whose
    files are symlinks into a store is opened from memory with the locations rewritten this way.
    """
    real_root = root.resolve()
    resolved = {loc: (root / loc).resolve() for loc in external_files(proto)}
    if all(r.is_relative_to(real_root) for r in resolved.values()):
        return None
    base = Path(os.path.commonpath([str(r.parent) for r in resolved.values()]))
    return base, {loc: r.relative_to(base).as_posix() for loc, r in resolved.items()}


def check_graph(root: Path, manifest: Manifest) -> None:
    """The manifest agrees with ``model.onnx`` (read without its external data); ManifestError otherwise.

    The one place where every field the graph determines is compared with it.
    """
    path = root / manifest.model
    proto = read_graph(root, manifest)
    origin = f"{root / MANIFEST}"
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    if len(initializers) != len(graph.initializer):
        seen: set[str] = set()
        twice = next(t.name for t in graph.initializer if t.name in seen or seen.add(t.name))
        raise ManifestError(f"{path}: initializer {twice!r} is defined twice (ONNX Runtime would use one "
                            f"silently)")
    for kind, specs, values in (("input", manifest.inputs, [v for v in graph.input if v.name not in initializers]),
                                ("output", manifest.outputs, list(graph.output))):
        if [s.name for s in specs] != [v.name for v in values]:
            raise ManifestError(f"{origin}: {kind}s {[s.name for s in specs]} do not match the graph's "
                                f"{[v.name for v in values]}"[:300])
        for spec, value in zip(specs, values):
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
            if ONNX_ELEMENT_TYPES.get(spec.dtype) != tensor.elem_type or list(spec.shape) != dims:
                raise ManifestError(f"{origin}: {kind} {spec.name!r} is {spec.dtype} {spec.shape} here, "
                                    f"the graph has element type {tensor.elem_type} {dims}")
    for spec in manifest.inputs + manifest.outputs:
        if spec.name.startswith(("past_", "present_")) and spec.dtype != manifest.dtype:
            raise ManifestError(f"{origin}: dtype {manifest.dtype} but the graph's {spec.name} is {spec.dtype}")
    cfg = manifest.model_config
    past = [s for s in manifest.inputs if s.name.startswith("past_key.")]
    if len(past) != cfg.num_layers:
        raise ManifestError(f"{origin}: num_layers {cfg.num_layers} but the graph has {len(past)} past_key inputs")
    for spec in manifest.inputs + manifest.outputs:
        if not spec.name.startswith(("past_", "present_")):
            continue
        layer = spec.name.rpartition(".")[2]
        if not layer.isdigit() or int(layer) >= cfg.num_layers:
            raise ManifestError(f"{origin}: {spec.name} names no layer of {cfg.num_layers}")
        capacity = manifest.layers[int(layer)].capacity
        want = [cfg.num_kv_heads, capacity, cfg.head_dim]
        if list(spec.shape[1:]) != want:
            raise ManifestError(f"{origin}: {spec.name} is {spec.shape[1:]} in the graph; the manifest's "
                                f"layers[{layer}].capacity {capacity} and config give {want}")
    logits = next((s for s in manifest.outputs if s.name == "logits"), None)
    if logits is None or logits.shape[-1] != cfg.vocab_size:
        raise ManifestError(f"{origin}: vocab_size {cfg.vocab_size} does not match the graph's logits")
    counts: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain or 'ai.onnx'}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    if counts != manifest.ops:
        key = min(k for k in set(counts) | set(manifest.ops) if counts.get(k, 0) != manifest.ops.get(k, 0))
        raise ManifestError(f"{origin}: ops do not match the graph's node counts ({key}: "
                            f"{manifest.ops.get(key, 0)} in {MANIFEST}, {counts.get(key, 0)} in the graph)")
    functions = {(f.domain, f.name) for f in proto.functions}
    for node in graph.node:
        if node.domain not in ORT_DOMAINS and (node.domain, node.op_type) not in functions:
            raise ManifestError(f"{path}: node {node.name!r} is {node.domain}::{node.op_type}, an op neither "
                                f"ONNX Runtime nor the graph's own functions define")
    rows = {t.name: t.dims[0] for t in graph.initializer if t.name in ROPE_TABLES}
    if rows and manifest.max_position not in set(rows.values()):
        raise ManifestError(f"{origin}: max_position {manifest.max_position} but the graph's rotary tables have "
                            f"{sorted(set(rows.values()))} rows")
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    if gqa and len(gqa) != cfg.num_layers:
        raise ManifestError(f"{origin}: {cfg.num_layers} layers but the graph has {len(gqa)} GroupQueryAttention nodes")
    for layer, node in enumerate(gqa):  # one per layer, in graph (= layer) order
        want_lws = manifest.layers[layer].local_window_size
        lws = next((a.i for a in node.attribute if a.name == "local_window_size"), -1)
        if lws != (-1 if want_lws is None else want_lws):
            raise ManifestError(f"{origin}: layers[{layer}].local_window_size {want_lws} but the graph's "
                                f"node {node.name!r} has {lws}")
    produced = {out for node in graph.node for out in node.output}
    for lo in manifest.layer_outputs:
        for name in (lo.after_attention, lo.after_block):
            if name not in produced:
                raise ManifestError(f"{origin}: layer_outputs names {name!r}, which the graph does not compute")
    for q in manifest.quantization.tensors if manifest.quantization else []:
        for name in (q.codes, q.scales, q.zero_points):
            if name is not None and name not in initializers:
                raise ManifestError(f"{origin}: quantization tensor {q.weight!r} names initializer {name!r}, "
                                    f"which the graph does not hold")
    _check_external_data(root, manifest, proto, origin)


def verify_export(root: Path, manifest: Manifest, verify: bool = True) -> None:
    """Everything :mod:`mtx.integrity` checks; ``verify=False`` skips the sha256 of the files."""
    if verify:
        verify_hashes(root, manifest)
    check_graph(root, manifest)
