"""Each weight once (docs/ops.md §6): the export folder stores every initializer of the graph exactly once,
in the form the graph reads it, and no other weight bytes.

Checked from the files themselves, independently of the exporter's own accounting: the external-data
ranges of the initializers tile each weight file (``model.onnx.data`` from byte 0, a checkpoint file
from the end of its safetensors header) without gaps or overlaps, every initializer is read by a
node of the graph, and the manifest's ``weights`` figures agree.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import onnx
import pytest

from mtx.manifest import read_manifest

ELEMENT_BITS = {onnx.TensorProto.FLOAT: 32, onnx.TensorProto.FLOAT16: 16, onnx.TensorProto.BFLOAT16: 16,
                onnx.TensorProto.INT64: 64, onnx.TensorProto.INT32: 32, onnx.TensorProto.UINT8: 8,
                onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4}

CASES = [
    ("mistral", "onnxruntime", {}),  # packed QKV: the checkpoint's q/k/v are not read, nothing referenced
    ("mistral", "onnx", {}),  # every checkpoint tensor read as stored: the file is referenced
    ("mixtral4", "onnxruntime", {}),
    ("mixtral4", "onnx", {}),  # stacked experts: the per-expert tensors are not read
    ("sharded", "onnx", {}),  # some shards are read whole (referenced), others not (written)
    ("mistral", "onnxruntime", dict(dtype="float16")),
    ("mistral", "onnxruntime", dict(quantize="int8")),
    ("mistral", "onnx", dict(quantize="int4", block_size=32)),
    ("mistral", "onnx", dict(quantize="int4", quantize_embedding=False, quantize_lm_head=False)),
    ("mixtral4", "onnxruntime", dict(quantize="int4", block_size=32)),
    ("mixtral4", "onnx", dict(quantize="int8", block_size=64)),
    ("tied", "onnxruntime", dict(quantize="int4", block_size=32)),
    ("tied", "onnx", {}),
]


def _safetensors_header(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def _ranges(proto: onnx.ModelProto) -> dict[str, list[tuple[int, int, str]]]:
    """Location -> sorted (offset, length, initializer) of every initializer (all stored externally)."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    for t in proto.graph.initializer:
        assert t.data_location == onnx.TensorProto.EXTERNAL, f"{t.name} is stored inside model.onnx"
        info = {e.key: e.value for e in t.external_data}
        n = int(np.prod(t.dims, dtype=np.int64))
        length = int(info["length"])
        assert length == -(-n * ELEMENT_BITS[t.data_type] // 8), t.name
        out.setdefault(info["location"], []).append((int(info.get("offset", 0)), length, t.name))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.parametrize("variant,target,options", CASES, ids=[f"{v}-{t}-{i}" for i, (v, t, _) in enumerate(CASES)])
def test_each_weight_once(parity_export, variant, target, options):
    out = parity_export(variant, target, **options)
    m = read_manifest(out)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    read = {i for n in proto.graph.node for i in n.input}
    unread = [t.name for t in proto.graph.initializer if t.name not in read]
    assert not unread, f"initializers no node reads: {unread}"

    roles = {f.path: f.role for f in m.files if f.role in ("weights", "checkpoint-weights")}
    ranges = _ranges(proto)
    assert set(ranges) == set(roles), "every weight file holds initializers, and only listed files do"
    initializer_bytes = sum(length for rs in ranges.values() for _, length, _ in rs)
    file_bytes = overhead = 0
    for location, rs in ranges.items():
        size = (out / location).stat().st_size
        start = _safetensors_header(out / location) if roles[location] == "checkpoint-weights" else 0
        at = start
        for offset, length, name in rs:  # back to back: no gap (unread bytes), no overlap (a second reader)
            assert offset == at, f"{location}: {name} at {offset}, expected {at}"
            at += length
        assert at == size, f"{location}: {size - at} bytes after the last initializer"
        file_bytes += size
        overhead += start
    # the sum of initializer bytes the graph reads is the bytes on disk, less the safetensors headers
    assert initializer_bytes == file_bytes - overhead

    w = m.weights
    data = out / "model.onnx.data"
    assert w["written_bytes"] == (data.stat().st_size if data.exists() else 0)
    assert w["referenced_bytes"] == sum(s for loc, rs in ranges.items() if roles[loc] == "checkpoint-weights"
                                        for _, s, _ in rs)
    assert w["written_tensors"] + w["referenced_tensors"] == len(proto.graph.initializer)
    assert set(w["checkpoint_files"]) == {p for p, r in roles.items() if r == "checkpoint-weights"}

    referenced = {p for p, r in roles.items() if r == "checkpoint-weights"}
    if (variant, target, options) in [("mistral", "onnx", {}), ("tied", "onnx", {})]:
        assert referenced == {"model.safetensors"}  # read whole, so referenced rather than copied again
    elif variant == "sharded":
        assert referenced and "model.onnx.data" in roles  # both kinds
    else:
        assert not referenced
