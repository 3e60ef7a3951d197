"""``mtx.json``: what an export folder holds and how to run it (docs/ops.md §5 is the schema).

:func:`read_manifest` validates a manifest completely and returns a :class:`Manifest`;
``Manifest.from_dict(d).to_dict() == d`` for every valid manifest ``d``. Keys, types and allowed
values come from ``manifest_schema.json`` (the machine-readable form of docs/ops.md §5, which the C++
reader embeds too); the rules a schema cannot say (layer order and count, config values, files on
disk) are code here and in cpp/src/manifest.cpp.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtx.config import ModelConfig
from mtx.errors import MtxError
from mtx.names import DTYPES, TARGETS  # noqa: F401  (re-exported for mtx.exporter.options)

MANIFEST = "mtx.json"
SCHEMA_FILE = Path(__file__).with_name("manifest_schema.json")
#: The parsed schema file: {"format", "format_version", "root", "objects": {name: {key: type}}}.
SCHEMA: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
FORMAT: str = SCHEMA["format"]
FORMAT_VERSION: int = SCHEMA["format_version"]  # 2: layer_outputs, role "tooling"; 3: quantization; 4: layers


class ManifestError(MtxError):
    """An export folder whose mtx.json is missing, malformed or does not match its files."""


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: ``shape`` entries are ints or the dynamic axis names ``batch`` / ``seq``."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class KVSpec:
    """How a runtime must hold and pass the per-layer KV buffers of this export."""

    layout: str  # "ring": slot p mod C; "ort_window": ONNX Runtime's own windowed layout (opaque); "per_layer"
    past_present: str  # "separate": never alias past and present; "shared": bind both to one buffer
    multi_token_batch: str  # "any", or "first_call_only": seq > 1 with batch > 1 only if every start_pos is 0


@dataclass(frozen=True)
class KVLayer:
    """Layer ``l``'s KV buffers (docs/ops.md §1 "Per-layer windows"): invariant ``capacity >= window``."""

    window: int  # the layer's attention attribute W_l, 0 = full attention
    capacity: int  # C_l, dimension 2 of past_*.{l}
    layout: str  # "ring" | "ort_window"
    local_window_size: int | None  # the layer's GroupQueryAttention attribute, or None


def summarize_layers(layers: list[KVLayer]) -> dict[str, Any]:
    """The manifest's top-level ``window``, ``capacity``, ``local_window_size`` and ``kv.layout`` implied by
    ``layers``: the value every layer has, else null (``per_layer`` for the layout)."""
    def common(name: str, differ: Any) -> Any:
        values = {getattr(x, name) for x in layers}
        return values.pop() if len(values) == 1 else differ

    return {"window": common("window", None), "capacity": common("capacity", None),
            "local_window_size": common("local_window_size", None), "kv.layout": common("layout", "per_layer")}


@dataclass(frozen=True)
class Fallback:
    """Blocks that kept their mtx node (and function body) although the target prefers another op."""

    op: str
    layers: list[int]
    reason: str


@dataclass(frozen=True)
class LayerOutput:
    """Names of values inside model.onnx holding layer ``layer``'s residual stream [batch, seq, H] in T."""

    layer: int
    after_attention: str  # x + attention(attn_norm(x))
    after_block: str  # the layer's output


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantised weight of the graph (docs/ops.md §5, §7): initializer names of its codes, scales and
    zero points (null: the op's default zero point), the float tensor it replaces and its sources."""

    weight: str
    sources: list[str]
    shape: list[int]  # logical float shape [..., N, K]
    bits: int
    op: str  # "domain::op_type" consuming the codes
    codes: str
    scales: str
    zero_points: str | None


@dataclass(frozen=True)
class Quantization:
    """How an export's weights were quantised (docs/ops.md §7); ``Manifest.quantization`` is None for float."""

    method: str  # "rtn"
    bits: int
    block_size: int
    scheme: str  # "asymmetric" | "symmetric"
    accuracy_level: int | None  # onnxruntime target; None for the others
    lm_head: bool
    tensors: list[QuantizedTensor]

    def spec(self, bits: int | None = None):
        """The mtx.quantize.QuantSpec of the projections (or of ``bits``-bit tensors such as the lm_head)."""
        from mtx.quantize import QuantSpec

        return QuantSpec(bits or self.bits, self.block_size, self.scheme)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the export folder
    role: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A validated mtx.json, read by attribute (``m.capacity``, ``m.kv.layout``)."""

    format: str
    format_version: int
    target: str
    model: str
    dtype: str
    config: dict[str, Any]
    window: int | None  # the op attribute of every layer: W, 0 = full attention; None where layers differ
    capacity: int | None  # C of every layer; None where layers differ (``layers``)
    layers: list[KVLayer]
    max_batch: int
    max_position: int | None
    kv: KVSpec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ops: dict[str, int]  # node counts of the main graph by "domain::op_type"
    attention_op: str
    moe_op: str | None
    local_window_size: int | None  # GroupQueryAttention attribute written (onnxruntime target)
    fallbacks: list[Fallback]
    layer_outputs: list[LayerOutput]
    quantization: Quantization | None
    engine: str | None
    engine_status: str
    checkpoint: dict[str, Any]
    weights: dict[str, Any]
    versions: dict[str, str | None]
    files: list[FileEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (fresh copy); ``Manifest.from_dict(m.to_dict()) == m``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, origin: str = MANIFEST) -> Manifest:
        """Validate ``d`` (parsed JSON) and build a Manifest; raises ManifestError naming the key."""
        # The version first: a folder of another format version has other keys; it is to be exported again.
        if isinstance(d, dict) and "format" in d and "format_version" in d and (
                d["format"] != FORMAT or d["format_version"] != FORMAT_VERSION):
            raise ManifestError(f"{origin}: not an {FORMAT} v{FORMAT_VERSION} manifest "
                                f"(format {_json(d['format'])}, version {_json(d['format_version'])}); "
                                f"export the checkpoint again with this mtx")
        check_schema(d, origin)
        for i, lo in enumerate(d["layer_outputs"]):
            if lo["layer"] != i:
                raise ManifestError(f"{origin}: layer_outputs[{i}] is for layer {lo['layer']}; expected layer {i}")
        try:
            cfg = ModelConfig.from_dict(d["config"], origin=f"{origin}: config")
        except MtxError as e:
            raise ManifestError(str(e)) from None
        if len(d["layer_outputs"]) != cfg.num_layers:
            raise ManifestError(f"{origin}: layer_outputs has {len(d['layer_outputs'])} entries for "
                                f"{cfg.num_layers} layers")
        if len(d["layers"]) != cfg.num_layers:
            raise ManifestError(f"{origin}: layers has {len(d['layers'])} entries for {cfg.num_layers} layers")
        layers = [KVLayer(**x) for x in d["layers"]]
        for i, x in enumerate(layers):
            if x.window < 0 or x.capacity <= 0 or x.capacity < x.window:
                raise ManifestError(f"{origin}: layers[{i}]: capacity {x.capacity} must be positive and >= the "
                                    f"window {x.window}")
        summary = summarize_layers(layers)
        for key, want in summary.items():
            got = d["kv"]["layout"] if key == "kv.layout" else d[key]
            if got != want:
                why = "the layers differ" if want in (None, "per_layer") else "every layer's value"
                raise ManifestError(f"{origin}: key '{key}' must be {_json(want)} ({why}), got {_json(got)}")
        kv, quant = d["kv"], d["quantization"]
        if quant is not None:
            quant = Quantization(**{**quant, "tensors": [QuantizedTensor(**t) for t in quant["tensors"]]})
        return cls(**{**d, "kv": KVSpec(**kv), "layers": layers, "inputs": [TensorSpec(**s) for s in d["inputs"]],
                      "outputs": [TensorSpec(**s) for s in d["outputs"]],
                      "fallbacks": [Fallback(**f) for f in d["fallbacks"]],
                      "layer_outputs": [LayerOutput(**lo) for lo in d["layer_outputs"]], "quantization": quant,
                      "files": [FileEntry(**f) for f in d["files"]]})

    @property
    def ort_aliases_past_present(self) -> bool:
        """Whether ONNX Runtime may bind past_* and present_* to the same memory (docs/ops.md §5).

        Only where the target shares them and attention runs as an ORT op: ORT running an mtx function
        body (a tensorrt export) must not alias them, or the body's ScatterElements overwrites keys the
        chunk still reads.
        """
        return self.kv.past_present == "shared" and not self.attention_op.startswith("mtx::")

    @property
    def kv_plan(self):
        """The per-layer windows, capacities and layouts (:class:`mtx.rolling_kv.KVPlan`)."""
        from mtx.rolling_kv import KVPlan

        return KVPlan(tuple(x.window for x in self.layers), tuple(x.capacity for x in self.layers),
                      tuple(x.layout for x in self.layers))

    @property
    def reference_plan(self):
        """:attr:`kv_plan` with every layout ``ring``: the PyTorch reference's buffers for this export."""
        from mtx.rolling_kv import KVPlan

        return KVPlan(tuple(x.window for x in self.layers), tuple(x.capacity for x in self.layers))

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config, origin=MANIFEST)

    def file(self, role: str) -> list[FileEntry]:
        return [f for f in self.files if f.role == role]


_NAMES = {"str": "a string", "int": "an integer", "num": "a number", "bool": "true or false",
          "object": "an object", "array": "an array"}


def _json(value: Any) -> str:
    """``value`` as compact JSON (as the C++ reader's nlohmann dump), cut to 60 characters."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(kind: str) -> str:
    """The phrase of a schema type in messages: ``int?`` -> ``an integer or null``."""
    if kind.endswith("?"):
        return _describe(kind[:-1]) + " or null"
    if kind[0] == "[":
        return "an array"
    if "|" in kind and kind[0] != "{":
        return " or ".join(_describe(k) for k in kind.split("|"))
    return _NAMES.get(kind, "an object")  # {T} and named objects


def _shallow(value: Any, kind: str) -> bool:
    """Whether ``value`` has the JSON type of ``kind`` (not looking inside arrays and objects)."""
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "num":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "array" or kind.startswith("["):
        return isinstance(value, list)
    return isinstance(value, dict)  # object, {T}, a named object


def _check(value: Any, kind: str | list, key: str, origin: str) -> None:
    """Check ``value`` at ``key`` (a path such as ``files[2].role``) against a schema type."""
    if isinstance(kind, list):  # allowed values
        base = "str" if isinstance(kind[0], str) else "int"
        if not (_shallow(value, base) and value in kind):
            raise ManifestError(f"{origin}: key '{key}' must be one of {', '.join(map(str, kind))}, "
                                f"got {_json(value)}")
        return
    if value is None and kind.endswith("?"):
        return
    said, kind = kind, kind.removesuffix("?")
    alts = [kind] if kind[0] in "[{" else kind.split("|")  # [T] and {T} hold their own unions
    alt = next((k for k in alts if _shallow(value, k)), None)
    if alt is None:
        raise ManifestError(f"{origin}: key '{key}' must be {_describe(said)}, got {_json(value)}")
    if alt.startswith("["):
        for i, item in enumerate(value):
            _check(item, alt[1:-1], f"{key}[{i}]", origin)
    elif alt.startswith("{"):
        for k in sorted(value):
            _check(value[k], alt[1:-1], f"{key}.{k}", origin)
    elif alt in SCHEMA["objects"]:
        _check_object(value, alt, key, origin)


def _check_object(d: dict[str, Any], name: str, prefix: str, origin: str) -> None:
    """Exactly the keys of schema object ``name`` (those ending in ``?`` may be absent), each of its type."""
    spec = {k.removesuffix("?"): (k.endswith("?"), t) for k, t in SCHEMA["objects"][name].items()}
    path = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    missing = [k for k, (optional, _) in spec.items() if not optional and k not in d]
    if missing:
        raise ManifestError(f"{origin}: missing key '{path(missing[0])}'")
    unknown = sorted(set(d) - set(spec))
    if unknown:
        raise ManifestError(f"{origin}: unknown key '{path(unknown[0])}'")
    for k, (_, kind) in spec.items():
        if k in d:
            _check(d[k], kind, path(k), origin)


def check_schema(d: Any, origin: str = MANIFEST) -> None:
    """Check parsed JSON against manifest_schema.json; raises ManifestError naming the first bad key."""
    if not isinstance(d, dict):
        raise ManifestError(f"{origin}: expected a JSON object")
    _check_object(d, SCHEMA["root"], "", origin)


def sha256_file(path: Path, progress=None, chunk: int = 16 << 20) -> str:
    """Hex sha256 of a file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


#: Deepest nesting a manifest may have (it needs 4); deeper is refused, by Python's parser or this check.
MAX_DEPTH = 64


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path


def read_manifest(out_dir: str | Path, verify_hashes: bool = False) -> Manifest:
    """Read and validate ``OUT/mtx.json``; check that every listed file exists with its size.

    ``verify_hashes`` also recomputes each file's sha256 (reads every byte of the export).
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{out_dir}: not an mtx export (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:  # Python's parser recurses per level; the C++ reader refuses the same depth
        raise ManifestError(f"{path}: not valid JSON (nested more than {MAX_DEPTH} levels)") from None
    if _depth(data) > MAX_DEPTH:
        raise ManifestError(f"{path}: not valid JSON (nested more than {MAX_DEPTH} levels)")
    manifest = Manifest.from_dict(data, origin=str(path))
    for entry in manifest.files:
        f = out_dir / entry.path
        if not entry.path or Path(entry.path).is_absolute() or ".." in Path(entry.path).parts:
            raise ManifestError(f"{path}: file path '{entry.path}' must stay inside the export folder")
        if not f.is_file():
            raise ManifestError(f"{f}: listed in {MANIFEST} but missing")
        if f.stat().st_size != entry.bytes:
            raise ManifestError(f"{f}: {f.stat().st_size} bytes, {MANIFEST} records {entry.bytes}")
        if verify_hashes and sha256_file(f) != entry.sha256:
            raise ManifestError(f"{f}: sha256 differs from {MANIFEST}")
    if not any(e.path == manifest.model and e.role == "model" for e in manifest.files):
        raise ManifestError(f"{path}: model '{manifest.model}' is not listed under files")
    if manifest.engine is not None and not any(e.path == manifest.engine and e.role == "engine"
                                               for e in manifest.files):
        raise ManifestError(f"{path}: engine '{manifest.engine}' is not listed under files with role engine")
    return manifest
