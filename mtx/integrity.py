"""Integrity of an export at load: the model that loads is the model that was exported.

:func:`verify_export` runs on every :func:`mtx.load` of an export (``verify=False`` skips the hashes):

* the sha256 of every small file (graph, tokenizer, tooling) is recomputed each time;
* the weights (``weights``, ``checkpoint-weights``, ``engine``) are hashed once, in parallel, and the
  verified state (path, device, inode, size, mtime and ctime, digest) is recorded in
  ``$MTX_CACHE_DIR`` (default ``~/.cache/mtx``); a later load skips a file whose state is unchanged;
* the manifest is checked against the graph itself (inputs, outputs, their dtypes and shapes, the KV
  capacity, layers, vocabulary, op counts, rotary table rows), so a tampered ``mtx.json`` is one line,
  not an ONNX Runtime traceback.
"""

from __future__ import annotations

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
    except (OSError, ValueError):
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


def check_graph(root: Path, manifest: Manifest) -> None:
    """The manifest agrees with ``model.onnx`` (read without its external data); ManifestError otherwise."""
    import onnx

    path = root / manifest.model
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is "not the exported graph"
        raise ManifestError(f"{path}: not a readable ONNX model ({str(e).strip().splitlines()[0][:200]})") from None
    origin = f"{root / MANIFEST}"
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
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
    cfg = manifest.model_config
    past = [s for s in manifest.inputs if s.name.startswith("past_key.")]
    if len(past) != cfg.num_layers:
        raise ManifestError(f"{origin}: num_layers {cfg.num_layers} but the graph has {len(past)} past_key inputs")
    want = [cfg.num_kv_heads, manifest.capacity, cfg.head_dim]
    for spec in manifest.inputs + manifest.outputs:
        if spec.name.startswith(("past_", "present_")) and list(spec.shape[1:]) != want:
            raise ManifestError(f"{origin}: {spec.name} is {spec.shape[1:]} in the graph; the manifest's "
                                f"capacity {manifest.capacity} and config give {want}")
    logits = next((s for s in manifest.outputs if s.name == "logits"), None)
    if logits is None or logits.shape[-1] != cfg.vocab_size:
        raise ManifestError(f"{origin}: vocab_size {cfg.vocab_size} does not match the graph's logits")
    counts: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain or 'ai.onnx'}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    if counts != manifest.ops:
        raise ManifestError(f"{origin}: ops do not match the graph's node counts")
    rows = {t.name: t.dims[0] for t in graph.initializer if t.name in ROPE_TABLES}
    if rows and manifest.max_position not in set(rows.values()):
        raise ManifestError(f"{origin}: max_position {manifest.max_position} but the graph's rotary tables have "
                            f"{sorted(set(rows.values()))} rows")


def verify_export(root: Path, manifest: Manifest, verify: bool = True) -> None:
    """Everything :mod:`mtx.integrity` checks; ``verify=False`` skips the sha256 of the files."""
    if verify:
        verify_hashes(root, manifest)
    check_graph(root, manifest)
