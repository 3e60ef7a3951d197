"""mtx.json: one schema (mtx/manifest_schema.json) and one tamper table, run against both readers.

Each case of TAMPER edits a copy of a good export; the Python reader (``mtx.manifest.read_manifest``)
and the C++ one (``mtx::detail::read_manifest``, through build/cpp/mtx_cpp_check's ``manifest`` op,
all folders in one run) must refuse it with one line holding the case's needle (the key's path for
key, type and value errors), and say it in the same words. Cases with needle None must be accepted.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mtx import config as mtx_config
from mtx import manifest as mm
from mtx.names import DTYPES, TARGETS

Edit = Callable[[Path], Any]


def manifest(edit: Callable[[dict], Any]) -> Edit:
    """A folder edit changing the parsed mtx.json with ``edit``."""
    def apply(folder: Path) -> None:
        path = folder / "mtx.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return apply


def nested(levels: int) -> list:
    """``levels`` lists inside each other around a 0."""
    value: object = 0
    for _ in range(levels):
        value = [value]
    return value  # type: ignore[return-value]


def raw(text: str) -> Edit:
    """A folder edit replacing mtx.json with ``text``."""
    return lambda folder: (folder / "mtx.json").write_text(text)


def set_key(path: str, value: Any) -> Edit:
    """Set the value at a dotted path (``kv.layout``, ``inputs.0.shape``)."""
    *parents, last = path.split(".")

    def edit(d: dict) -> None:
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        d[int(last) if isinstance(d, list) else last] = value
    return manifest(edit)


def drop_key(path: str) -> Edit:
    *parents, last = path.split(".")

    def edit(d: dict) -> None:
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        del d[int(last) if isinstance(d, list) else last]
    return manifest(edit)


#: A valid quantization entry (the readers do not check it against the graph).
QUANT = {"method": "rtn", "bits": 8, "block_size": 32, "scheme": "symmetric", "accuracy_level": None,
         "lm_head": True, "tensors": [{"weight": "output.weight", "sources": ["lm_head.weight"], "shape": [100, 64],
                                       "bits": 8, "op": "ai.onnx::DequantizeLinear", "codes": "output.weight.codes",
                                       "scales": "output.weight.scales", "zero_points": None}]}


def quant(edit: Callable[[dict], Any] = lambda q: None) -> Edit:
    """The manifest with QUANT as its quantization entry, changed by ``edit``."""
    def apply(d: dict) -> None:
        d["quantization"] = copy.deepcopy(QUANT)
        edit(d["quantization"])
    return manifest(apply)


def weights_file(edit: Callable[[Path], Any]) -> Edit:
    """A folder edit applied to the first listed weights file."""
    def apply(folder: Path) -> None:
        entry = next(f for f in json.loads((folder / "mtx.json").read_text())["files"]
                     if f["role"] in ("weights", "checkpoint-weights"))
        edit(folder / entry["path"])
    return apply


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def unlist_model(d: dict) -> None:
    d["files"] = [f for f in d["files"] if f["role"] != "model"]


def extra_file(**entry: Any) -> Edit:
    return manifest(lambda d: d["files"].append({"path": "x", "role": "tooling", "bytes": 1, "sha256": "0", **entry}))


#: (case, edit of a good export folder, needle both readers' message must hold; None: accepted).
TAMPER: list[tuple[str, Edit, str | None]] = [
    ("untouched", lambda folder: None, None),
    ("valid quantization", quant(), None),
    ("config without its defaulted keys",
     manifest(lambda d: [d["config"].pop(k) for k in ("tie_word_embeddings", "bos_token_id", "source_format")]), None),
    # The file and its version (docs/ops.md §5 rule 1).
    ("no mtx.json", lambda folder: (folder / "mtx.json").unlink(), "not an mtx export (no mtx.json)"),
    ("not JSON", raw("{not json"), "not valid JSON"),
    ("not an object", raw("[1, 2]"), "expected a JSON object"),
    # Nesting: at most 64 levels (top object 1, checkpoint 2, then lists), never a RecursionError or a crash.
    ("nested 64 deep", manifest(lambda d: d["checkpoint"].update(x=nested(62))), None),
    ("nested 65 deep", manifest(lambda d: d["checkpoint"].update(x=nested(63))),
     "not valid JSON (nested more than 64 levels)"),
    ("nested 200000 deep", raw("[" * 200000 + "]" * 200000), "not valid JSON (nested more than 64 levels)"),
    ("value nested 200000 deep", lambda folder: (folder / "mtx.json").write_text(
        (folder / "mtx.json").read_text().replace('"mtx-export"', "[" * 200000 + "]" * 200000, 1)),
     "not valid JSON (nested more than 64 levels)"),
    ("format version only", raw('{"format": "mtx-export"}'), "missing key 'format_version'"),
    ("format version 1", set_key("format_version", 1),
     'not an mtx-export v4 manifest (format "mtx-export", version 1); export the checkpoint again'),
    ("format version 3", manifest(lambda d: (d.pop("layers"), d.update(format_version=3))),
     'not an mtx-export v4 manifest (format "mtx-export", version 3); export the checkpoint again'),
    ("format name", set_key("format", "onnx-export"), 'not an mtx-export v4 manifest (format "onnx-export"'),
    ("format version string", set_key("format_version", "4"), "version \"4\")"),
    # Keys present, no others (rule 2).
    ("missing capacity", drop_key("capacity"), "missing key 'capacity'"),
    ("unknown top-level key", set_key("extra_key", 1), "unknown key 'extra_key'"),
    ("missing kv key", drop_key("kv.multi_token_batch"), "missing key 'kv.multi_token_batch'"),
    ("unknown kv key", set_key("kv.extra", 1), "unknown key 'kv.extra'"),
    ("missing input shape", drop_key("inputs.0.shape"), "missing key 'inputs[0].shape'"),
    ("unknown output key", set_key("outputs.0.extra", 1), "unknown key 'outputs[0].extra'"),
    ("unknown layer_outputs key", set_key("layer_outputs.1.extra", 1), "unknown key 'layer_outputs[1].extra'"),
    ("missing file sha256", drop_key("files.0.sha256"), "missing key 'files[0].sha256'"),
    ("missing config key", drop_key("config.vocab_size"), "missing key 'config.vocab_size'"),
    ("unknown config key", set_key("config.extra", 1), "unknown key 'config.extra'"),
    ("missing quantization key", quant(lambda q: q.pop("lm_head")), "missing key 'quantization.lm_head'"),
    ("missing quantized tensor scales", quant(lambda q: q["tensors"][0].pop("scales")),
     "missing key 'quantization.tensors[0].scales'"),
    ("unknown quantized tensor key", quant(lambda q: q["tensors"][0].update(extra=1)),
     "unknown key 'quantization.tensors[0].extra'"),
    # Exact types (rule 3): int is never a boolean or a float.
    ("max_batch as string", set_key("max_batch", "1"), "key 'max_batch' must be an integer, got \"1\""),
    ("capacity as float", set_key("capacity", 8.0), "key 'capacity' must be an integer or null, got 8.0"),
    ("window as boolean", set_key("window", True), "key 'window' must be an integer or null, got true"),
    ("max_position as string", set_key("max_position", "x"), "key 'max_position' must be an integer or null"),
    ("model null", set_key("model", None), "key 'model' must be a string, got null"),
    ("kv not an object", set_key("kv", [1]), "key 'kv' must be an object, got [1]"),
    ("inputs not an array", set_key("inputs", {}), "key 'inputs' must be an array"),
    ("input not an object", set_key("inputs.0", "input_ids"), "key 'inputs[0]' must be an object"),
    ("shape entry float", set_key("inputs.0.shape.1", 1.5), "key 'inputs[0].shape[1]' must be an integer or a string"),
    ("ops value string", manifest(lambda d: d["ops"].update({"ai.onnx::Add": "1"})),
     "key 'ops.ai.onnx::Add' must be an integer"),
    ("moe_op number", set_key("moe_op", 3), "key 'moe_op' must be a string or null"),
    ("fallback layers strings", set_key("fallbacks", [{"op": "x", "layers": ["0"], "reason": "r"}]),
     "key 'fallbacks[0].layers[0]' must be an integer"),
    ("fallback reason number", set_key("fallbacks", [{"op": "x", "layers": [0], "reason": 1}]),
     "key 'fallbacks[0].reason' must be a string"),
    ("layer index string", set_key("layer_outputs.0.layer", "0"), "key 'layer_outputs[0].layer' must be an integer"),
    ("checkpoint not an object", set_key("checkpoint", "ckpt"), "key 'checkpoint' must be an object"),
    ("versions value number", set_key("versions.mtx", 1), "key 'versions.mtx' must be a string or null"),
    ("file bytes string", set_key("files.0.bytes", "1"), "key 'files[0].bytes' must be an integer"),
    ("config tie as string", set_key("config.tie_word_embeddings", "false"),
     "key 'config.tie_word_embeddings' must be true or false, got \"false\""),
    ("config rope_theta string", set_key("config.rope_theta", "1e4"), "key 'config.rope_theta' must be a number"),
    ("config eos not a list", set_key("config.eos_token_ids", 2), "key 'config.eos_token_ids' must be an array"),
    ("config eos entry float", set_key("config.eos_token_ids", [2.0]), "key 'config.eos_token_ids[0]' must be an integer"),
    ("quantization lm_head string", quant(lambda q: q.update(lm_head="yes")), "key 'quantization.lm_head' must be true"),
    ("quantization accuracy float", quant(lambda q: q.update(accuracy_level=1.5)),
     "key 'quantization.accuracy_level' must be an integer or null"),
    ("quantized tensor sources", quant(lambda q: q["tensors"][0].update(sources="lm_head.weight")),
     "key 'quantization.tensors[0].sources' must be an array"),
    ("quantized tensor zero_points", quant(lambda q: q["tensors"][0].update(zero_points=0)),
     "key 'quantization.tensors[0].zero_points' must be a string or null"),
    # Allowed values.
    ("target", set_key("target", "tflite"), "key 'target' must be one of onnxruntime, onnx, tensorrt, got \"tflite\""),
    ("dtype", set_key("dtype", "int8"), "key 'dtype' must be one of float32, float16, bfloat16"),
    ("kv layout", set_key("kv.layout", "paged"), "key 'kv.layout' must be one of ring, ort_window, per_layer, got \"paged\""),
    ("kv past_present", set_key("kv.past_present", "aliased"), "key 'kv.past_present' must be one of separate, shared"),
    ("kv multi_token_batch", set_key("kv.multi_token_batch", 1), "key 'kv.multi_token_batch' must be one of any"),
    ("file role", set_key("files.0.role", "junk"), "key 'files[0].role' must be one of model, weights"),
    ("config model_type", set_key("config.model_type", "llama"), "key 'config.model_type' must be one of mistral, mixtral"),
    ("config source_format", set_key("config.source_format", "gguf"), "key 'config.source_format' must be one of hf"),
    ("quantization method", quant(lambda q: q.update(method="gptq")), "key 'quantization.method' must be one of rtn"),
    ("quantization bits 3", quant(lambda q: q.update(bits=3)), "key 'quantization.bits' must be one of 4, 8, got 3"),
    ("quantization bits true", quant(lambda q: q.update(bits=True)), "key 'quantization.bits' must be one of 4, 8, got true"),
    ("quantization block_size", quant(lambda q: q.update(block_size=16)),
     "key 'quantization.block_size' must be one of 32, 64, 128, got 16"),
    ("quantization scheme", quant(lambda q: q.update(scheme="nf4")), "key 'quantization.scheme' must be one of asymmetric"),
    ("quantized tensor bits", quant(lambda q: q["tensors"][0].update(bits=2)),
     "key 'quantization.tensors[0].bits' must be one of 4, 8, got 2"),
    # Config values and layer_outputs (rule 4).
    ("config vocab_size 0", set_key("config.vocab_size", 0), "config: 'vocab_size' must be a positive integer, got 0"),
    ("config num_heads not a multiple", set_key("config.num_heads", 3),
     "config: num_attention_heads (3) must be a multiple of num_key_value_heads (2)"),
    ("config head_dim odd", set_key("config.head_dim", 15), "config: head_dim must be even"),
    ("config sliding_window 0", set_key("config.sliding_window", 0), "config: 'sliding_window' must be a positive integer"),
    ("config rope_theta 0", set_key("config.rope_theta", 0), "config: rope_theta must be > 0, got 0"),
    ("config rms_norm_eps negative", set_key("config.rms_norm_eps", -1e-5), "config: rms_norm_eps must be > 0"),
    ("config experts_per_tok 0", manifest(lambda d: d["config"].update(num_experts=4, num_experts_per_tok=0)),
     "config: 'num_experts_per_tok' must be a positive integer, got 0"),
    ("config experts_per_tok too many", manifest(lambda d: d["config"].update(num_experts=2, num_experts_per_tok=3)),
     "config: num_experts_per_tok (3) exceeds num_local_experts (2)"),
    ("config eos negative", set_key("config.eos_token_ids", [-1]), "config: token ids must be integers >= 0"),
    ("config bos negative", set_key("config.bos_token_id", -1), "config: token ids must be integers >= 0"),
    ("layer_outputs out of order", set_key("layer_outputs.1.layer", 0), "layer_outputs[1] is for layer 0; expected layer 1"),
    ("config num_layers 3", set_key("config.num_layers", 3), "layer_outputs has 2 entries for 3 layers"),
    ("layer_outputs short", manifest(lambda d: d["layer_outputs"].pop()), "layer_outputs has 1 entries for 2 layers"),
    # Per-layer KV (rule 4): one entry per layer, C_l >= W_l, summaries that agree with the layers.
    ("missing layers", drop_key("layers"), "missing key 'layers'"),
    ("layer window string", set_key("layers.0.window", "8"), "key 'layers[0].window' must be an integer"),
    ("layer layout", set_key("layers.1.layout", "paged"), "key 'layers[1].layout' must be one of ring, ort_window"),
    ("layers short", manifest(lambda d: d["layers"].pop()), "layers has 1 entries for 2 layers"),
    ("layer capacity below window", manifest(lambda d: d["layers"][1].update(capacity=4)),
     "layers[1]: capacity 4 must be positive and >= the window 8"),
    ("window disagrees with layers", set_key("window", 4), "key 'window' must be 8 (every layer's value), got 4"),
    ("capacity null with uniform layers", set_key("capacity", None),
     "key 'capacity' must be 8 (every layer's value), got null"),
    ("per-layer windows, window not null", manifest(lambda d: d["layers"][0].update(window=0, capacity=64)),
     "key 'window' must be null (the layers differ), got 8"),
    ("per-layer windows", manifest(lambda d: (d["layers"][0].update(window=0, capacity=64, layout="ring",
                                                                    local_window_size=None),
                                              d.update(window=None, capacity=None, local_window_size=None),
                                              d["kv"].update(layout="per_layer"))), None),
    ("kv layout per_layer for uniform layers", set_key("kv.layout", "per_layer"),
     "key 'kv.layout' must be \"ort_window\" (every layer's value), got \"per_layer\""),
    ("local_window_size disagrees", set_key("layers.0.local_window_size", 7),
     "key 'local_window_size' must be null (the layers differ), got 8"),
    ("config layer_windows uniform", set_key("config.layer_windows", [8, 8]),
     "config: 'layer_windows' is uniform (8); give sliding_window instead"),
    ("config layer_windows count", set_key("config.layer_windows", [0, 8, 8]),
     "config: 'layer_windows' must be 2 integers >= 0 (one window per layer, 0 = full attention), got [0,8,8]"),
    ("config layer_windows max", set_key("config.layer_windows", [0, 4]),
     "config: 'sliding_window' must be the largest layer window (4), got 8"),
    ("config layer_windows float", set_key("config.layer_windows", [0, 8.0]),
     "key 'config.layer_windows[1]' must be an integer"),
    # Files (rules 5 and 6).
    ("file outside", extra_file(path="../x"), "file path '../x' must stay inside the export folder"),
    ("file absolute", extra_file(path="/etc/passwd"), "file path '/etc/passwd' must stay inside the export folder"),
    ("file path empty", extra_file(path=""), "file path '' must stay inside the export folder"),
    ("file missing", weights_file(lambda p: p.unlink()), "listed in mtx.json but missing"),
    ("file size", weights_file(lambda p: p.write_bytes(b"")), "bytes, mtx.json records"),
    ("file changed", weights_file(flip_byte), "sha256 differs from mtx.json"),
    ("model not listed", manifest(unlist_model), "model 'model.onnx' is not listed under files"),
    ("engine not listed", set_key("engine", "../../etc/passwd"),
     "engine '../../etc/passwd' is not listed under files with role engine"),
]
#: Cases whose messages differ between the readers beyond the needle (the JSON parsers' own words;
#: the C++ runtime's longer advice on a changed file; Python's listing of the token ids).
OWN_WORDS = {"not JSON", "file changed", "config eos negative", "config bos negative"}


def _slug(case: str) -> str:
    return case.replace(" ", "_").replace("/", "_")


@pytest.fixture(scope="module")
def tampered(parity_export, tmp_path_factory) -> dict[str, Path]:
    """case -> a copy of a good export (2 layers, onnxruntime target) changed by the case's edit."""
    good = parity_export("mistral", "onnxruntime")
    root = tmp_path_factory.mktemp("tampered")
    folders = {}
    for case, edit, _ in TAMPER:
        folders[case] = root / _slug(case)
        shutil.copytree(good, folders[case])
        edit(folders[case])
    return folders


@pytest.fixture(scope="module")
def python_said(tampered) -> dict[str, str | None]:
    """case -> the Python reader's error message (None: accepted)."""
    said = {}
    for case, folder in tampered.items():
        try:
            mm.read_manifest(folder, verify_hashes=True)
            said[case] = None
        except mm.ManifestError as e:
            said[case] = str(e)
    return said


@pytest.fixture(scope="module")
def cpp_said(cpp_build, tampered, tmp_path_factory) -> dict[str, str | None]:
    """case -> the C++ reader's error message, one mtx_cpp_check run over every folder (hash record in a temp dir)."""
    tmp = tmp_path_factory.mktemp("cpp_manifest")
    req = tmp / "request.json"
    req.write_text(json.dumps({"op": "manifest", "exports": [str(f) for f in tampered.values()], "verify": True}))
    r = subprocess.run([str(cpp_build / "mtx_cpp_check"), str(req)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MTX_CACHE_DIR": str(tmp / "cache")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    results = json.loads(r.stdout)["results"]
    assert all("ok" in res or res["error"]["code"] == 2 for res in results), results  # ErrorCode::InvalidExport
    return {case: res["error"]["message"] if "error" in res else None for case, res in zip(tampered, results)}


@pytest.mark.parametrize("reader", ["python", "cpp"])
@pytest.mark.parametrize("case", [c[0] for c in TAMPER])
def test_tampered_manifest(request, reader, case):
    """Each reader refuses each tampered manifest with one line naming the key (or accepts a good one)."""
    needle = {c: n for c, _, n in TAMPER}[case]
    message = request.getfixturevalue(f"{reader}_said")[case]
    if needle is None:
        assert message is None, message
    else:
        assert message is not None, f"{reader} accepted {case!r}"
        assert "\n" not in message and needle in message, message


@pytest.mark.parametrize("case", [c for c, _, n in TAMPER if n is not None and c not in OWN_WORDS])
def test_both_readers_say_the_same(python_said, cpp_said, case):
    assert python_said[case] == cpp_said[case]


def test_schema_matches_the_python_types():
    """The dataclasses of mtx/manifest.py and ModelConfig have the schema's keys; its lists are mtx.names'."""
    objects = mm.SCHEMA["objects"]
    for name, cls in {"manifest": mm.Manifest, "kv": mm.KVSpec, "kv_layer": mm.KVLayer, "tensor": mm.TensorSpec, "fallback": mm.Fallback,
                      "layer_output": mm.LayerOutput, "quantization": mm.Quantization,
                      "quantized_tensor": mm.QuantizedTensor, "file": mm.FileEntry}.items():
        assert list(objects[name]) == [f.name for f in dataclasses.fields(cls)], name
    cfg_fields = [f for f in dataclasses.fields(mtx_config.ModelConfig) if f.name != "extra"]
    assert list(objects["config"]) == [f.name + ("?" if f.default is not dataclasses.MISSING else "")
                                       for f in cfg_fields]
    assert objects["manifest"]["target"] == list(TARGETS) and objects["manifest"]["dtype"] == list(DTYPES)
    assert objects["config"]["model_type"] == sorted(mtx_config._HF_FAMILIES)
    assert (mm.FORMAT, mm.FORMAT_VERSION) == ("mtx-export", 4)


def test_schema_types_are_known():
    """Every type in the schema file is of its grammar (docs/ops.md §5): a typo is not read as "object"."""
    objects = mm.SCHEMA["objects"]

    def known(kind: str | list) -> bool:
        if isinstance(kind, list):
            return bool(kind) and len({type(v) for v in kind}) == 1 and type(kind[0]) in (str, int)
        kind = kind.removesuffix("?")
        if kind[:1] in ("[", "{"):
            return kind[-1] == {"[": "]", "{": "}"}[kind[0]] and known(kind[1:-1])
        return all(k in ("str", "int", "num", "bool", "object", "array") or k in objects for k in kind.split("|"))

    assert mm.SCHEMA["root"] in objects
    for name, spec in objects.items():
        for key, kind in spec.items():
            assert known(kind), f"{name}.{key}: {kind!r}"


def test_cpp_embeds_the_schema_file(cpp_build):
    """The header CMake generated holds mtx/manifest_schema.json byte for byte."""
    header = (cpp_build / "generated" / "manifest_schema.hpp").read_text(encoding="utf-8")
    body = header.split('R"mtx_schema(', 1)[1].rsplit(')mtx_schema"', 1)[0]
    assert body == mm.SCHEMA_FILE.read_text(encoding="utf-8")
