"""Broken copies of a good export, shared by tests/test_reliability.py (Python runtime, CLI) and
tests/test_cpp.py (C++ runtime): each case is something a broken disk, a model store or a hostile
user leaves in an export folder, with the hashes in mtx.json rewritten to match (so that only the
check of the manifest against the graph, or ONNX Runtime itself, can catch it).

``BROKEN[name] = (make, needle)``: ``make(src, dst, other)`` writes the broken copy of export ``src``
at ``dst`` (``other``: an export of the same checkpoint for another target); ``needle`` is in the one
line both runtimes print. Exit status 2 for all of them (a bad artifact).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx


def rehash(folder: Path) -> None:
    """Rewrite bytes and sha256 of every file listed in ``folder``/mtx.json to the files' present state."""
    path = folder / "mtx.json"
    data = json.loads(path.read_text())
    for f in data["files"]:
        raw = (folder / f["path"]).read_bytes()
        f.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    path.write_text(json.dumps(data, indent=2))


def edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / "mtx.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def edit_graph(folder: Path, edit: Callable[[onnx.ModelProto], None]) -> None:
    """Apply ``edit`` to model.onnx (external data untouched), then rehash."""
    path = folder / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    edit(model)
    onnx.save(model, str(path))
    rehash(folder)


def data_file(folder: Path) -> str:
    """The export's model.onnx.data (tensors the exporter wrote: rotary tables, converted weights)."""
    assert (folder / "model.onnx.data").is_file(), sorted(p.name for p in folder.iterdir())
    return "model.onnx.data"


def _truncate(dst: Path) -> None:
    p = dst / data_file(dst)
    p.write_bytes(p.read_bytes()[:1000])
    rehash(dst)


def _locate(location: Callable[[Path], str]) -> Callable[[Path], None]:
    def make(dst: Path) -> None:
        outside = dst.parent / f"{dst.name}-outside.data"
        shutil.copy(dst / data_file(dst), outside)
        loc = location(outside)
        edit_graph(dst, lambda m: [e.__setattr__("value", loc) for t in m.graph.initializer
                                   for e in t.external_data if e.key == "location" and e.value == "model.onnx.data"])
    return make


def _unlisted(dst: Path) -> None:
    shutil.copy(dst / "model.onnx.data", dst / "stray.data")
    edit_graph(dst, lambda m: [e.__setattr__("value", "stray.data") for t in m.graph.initializer
                               for e in t.external_data if e.key == "location" and e.value == "model.onnx.data"])


def _unknown_domain(dst: Path) -> None:
    def edit(m: onnx.ModelProto) -> None:
        node = next(n for n in m.graph.node if n.op_type == "Sigmoid")
        node.domain = "org.unknown"
        m.opset_import.append(onnx.helper.make_opsetid("org.unknown", 1))
    edit_graph(dst, edit)

    def ops(d: dict) -> None:
        d["ops"]["ai.onnx::Sigmoid"] -= 1
        d["ops"] = {k: v for k, v in d["ops"].items() if v} | {"org.unknown::Sigmoid": 1}
    edit_manifest(dst, ops)


def _attribute(name: str, value: Callable[[int], int], manifest: Callable[[dict], None] | None = None):
    def make(dst: Path) -> None:
        def edit(m: onnx.ModelProto) -> None:
            for n in m.graph.node:
                if n.op_type == "GroupQueryAttention":
                    for a in n.attribute:
                        if a.name == name:
                            a.i = value(a.i)
        edit_graph(dst, edit)
        if manifest:
            edit_manifest(dst, manifest)
    return make


def _dtype_all(d: dict) -> None:
    d["dtype"] = "float16"
    for s in d["inputs"] + d["outputs"]:
        if s["name"].startswith(("past_", "present_")):
            s["dtype"] = "float16"


def _swap(dst: Path, other: Path) -> None:
    shutil.copy(other / "model.onnx", dst / "model.onnx")
    rehash(dst)


def _deep(dst: Path) -> None:
    (dst / "mtx.json").write_text("[" * 200000 + "]" * 200000)


def _deep_value(dst: Path) -> None:
    text = (dst / "mtx.json").read_text()
    (dst / "mtx.json").write_text(text.replace('"format": "mtx-export"', '"format": ' + "[" * 200000 + "]" * 200000, 1))


def _constant_outside(dst: Path) -> None:
    """A Constant node whose value lives in a file mtx.json does not list (found by review: only
    initializers' external data were checked, so its bytes escaped every hash)."""
    def edit(m: onnx.ModelProto) -> None:
        value = onnx.helper.make_tensor("stray", onnx.TensorProto.FLOAT, [4], [0.0] * 4)
        value.ClearField("float_data")
        value.data_location = onnx.TensorProto.EXTERNAL
        value.external_data.add(key="location", value="stray.bin")
        value.external_data.add(key="offset", value="0")
        m.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["stray_value"], name="stray_constant",
                                                     value=value))
    (dst / "stray.bin").write_bytes(b"\0" * 4096)
    edit_graph(dst, edit)
    edit_manifest(dst, lambda d: d["ops"].update({"ai.onnx::Constant": d["ops"].get("ai.onnx::Constant", 0) + 1}))


def _duplicate_initializer(dst: Path) -> None:
    def edit(m: onnx.ModelProto) -> None:
        twin = onnx.TensorProto()
        twin.CopyFrom(next(t for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL))
        m.graph.initializer.append(twin)
    edit_graph(dst, edit)


def _offset(text: str) -> Callable[[Path], None]:
    def make(dst: Path) -> None:
        edit_graph(dst, lambda m: [e.__setattr__("value", text) for t in m.graph.initializer[:1]
                                   for e in t.external_data if e.key == "offset"]
                   or [t.external_data.add(key="offset", value=text) for t in m.graph.initializer[:1]
                       if t.data_location == onnx.TensorProto.EXTERNAL])
    return make


BROKEN: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "Constant with external data": (lambda d, o: _constant_outside(d),
                                    "stores its data externally; only initializers of the main graph may"),
    "initializer defined twice": (lambda d, o: _duplicate_initializer(d), "is defined twice"),
    "offset with trailing junk": (lambda d, o: _offset("1024abc")(d), "is not a non-negative integer"),
    "offset past 2**63": (lambda d, o: _offset("99999999999999999999")(d), "is not a non-negative integer"),
    "offset near 2**63": (lambda d, o: _offset(str(2**63 - 100))(d), "is stored at bytes"),
    "truncated model.onnx.data": (lambda d, o: _truncate(d), "is stored at bytes"),
    "external data at ../": (lambda d, o: _locate(lambda p: f"../{p.name}")(d), "outside the export folder"),
    "external data at an absolute path": (lambda d, o: _locate(str)(d), "outside the export folder"),
    "external data not listed": (lambda d, o: _unlisted(d), "'stray.data', which"),
    "unknown op domain": (lambda d, o: _unknown_domain(d), "org.unknown::Sigmoid, an op neither"),
    "manifest dtype float16": (lambda d, o: edit_manifest(d, lambda m: m.update(dtype="float16")),
                               "dtype float16 but the graph's past_key.0 is float32"),
    "manifest dtype and KV float16": (lambda d, o: edit_manifest(d, _dtype_all), "input 'past_key.0' is float16"),
    "local_window_size differs": (lambda d, o: _attribute("local_window_size", lambda i: i + 1)(d),
                                  "local_window_size 8 but the graph's node"),
    "graph fails at run": (lambda d, o: _attribute("local_window_size", lambda i: i + 1,
                                                   lambda m: (m.update(local_window_size=9),
                                                              [x.update(local_window_size=9) for x in m["layers"]]))(d),
                           "failed to run it"),
    "graph fails at load": (lambda d, o: _attribute("kv_num_heads", lambda i: 3)(d), "cannot load it"),
    "model.onnx of another target": (_swap, "ops do not match the graph's node counts (ai.onnx::"),
    "layer_outputs name": (lambda d, o: edit_manifest(d, lambda m: m["layer_outputs"][0].update(after_block="nope")),
                           "layer_outputs names 'nope'"),
    "mtx.json nested 200000 deep": (lambda d, o: _deep(d), "not valid JSON (nested more than 64 levels)"),
    "mtx.json value nested 200000 deep": (lambda d, o: _deep_value(d), "not valid JSON (nested more than 64 levels)"),
}


def make_broken(case: str, src: Path, dst: Path, other: Path) -> str:
    """Copy ``src`` to ``dst``, break it as ``case`` says; returns the needle of the expected line."""
    shutil.copytree(src, dst)
    make, needle = BROKEN[case]
    make(dst, other)
    return needle


def store_symlinks(src: Path, dst: Path, store: Path) -> None:
    """Copy ``src`` to ``dst`` with its weight files moved into ``store`` (named by their sha256, as a
    deduplicated model store keeps them) and symlinked from ``dst``."""
    shutil.copytree(src, dst)
    store.mkdir(exist_ok=True)
    data = json.loads((dst / "mtx.json").read_text())
    for f in data["files"]:
        if f["role"] in ("weights", "checkpoint-weights"):
            blob = store / f["sha256"]
            shutil.move(dst / f["path"], blob)
            (dst / f["path"]).symlink_to(blob)
