"""``mtx.json``: what an export folder holds and how to run it (docs/ops.md §5 is the schema).

:func:`read_manifest` validates a manifest completely (every key, type and allowed value, and that
each listed file exists with the recorded size; optionally its sha256) and returns a
:class:`Manifest`; ``Manifest.from_dict(d).to_dict() == d`` for every valid manifest ``d``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mtx.config import ModelConfig
from mtx.errors import MtxError
from mtx.names import DTYPES, TARGETS

MANIFEST = "mtx.json"
FORMAT = "mtx-export"
FORMAT_VERSION = 3  # 2: layer_outputs, role "tooling"; 3: quantization (docs/ops.md §5)
LAYOUTS = ("ring", "ort_window")
PAST_PRESENT = ("separate", "shared")
MULTI_TOKEN = ("any", "first_call_only")
ROLES = ("model", "weights", "checkpoint-weights", "tokenizer", "engine", "tooling")


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

    layout: str  # "ring": slot p mod C; "ort_window": ONNX Runtime's own windowed layout (opaque)
    past_present: str  # "separate": never alias past and present; "shared": bind both to one buffer
    multi_token_batch: str  # "any", or "first_call_only": seq > 1 with batch > 1 only if every start_pos is 0


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
    window: int  # the op attribute: sliding window W, 0 = full attention
    capacity: int
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
                                f"(format {d['format']!r}, version {d['format_version']!r}); "
                                f"export the checkpoint again with this mtx")
        _check_keys(d, cls, origin)
        _choice(d, "target", TARGETS, origin)
        _choice(d, "dtype", DTYPES, origin)
        kv = d["kv"]
        _check_keys(kv, KVSpec, f"{origin}: kv")
        _choice(kv, "layout", LAYOUTS, f"{origin}: kv")
        _choice(kv, "past_present", PAST_PRESENT, f"{origin}: kv")
        _choice(kv, "multi_token_batch", MULTI_TOKEN, f"{origin}: kv")
        for key in ("inputs", "outputs"):
            for i, spec in enumerate(d[key]):
                _check_keys(spec, TensorSpec, f"{origin}: {key}[{i}]")
        for i, fb in enumerate(d["fallbacks"]):
            _check_keys(fb, Fallback, f"{origin}: fallbacks[{i}]")
        for i, lo in enumerate(d["layer_outputs"]):
            _check_keys(lo, LayerOutput, f"{origin}: layer_outputs[{i}]")
            if lo["layer"] != i:
                raise ManifestError(f"{origin}: layer_outputs[{i}] is for layer {lo['layer']}; expected layer {i}")
        for i, entry in enumerate(d["files"]):
            _check_keys(entry, FileEntry, f"{origin}: files[{i}]")
            _choice(entry, "role", ROLES, f"{origin}: files[{i}]")
        quant = d["quantization"]
        if quant is not None:
            _check_keys(quant, Quantization, f"{origin}: quantization")
            _choice(quant, "method", ("rtn",), f"{origin}: quantization")
            _choice(quant, "scheme", ("asymmetric", "symmetric"), f"{origin}: quantization")
            for key, allowed in (("bits", (4, 8)), ("block_size", (32, 64, 128))):
                if quant[key] not in allowed:
                    raise ManifestError(f"{origin}: quantization {key} {quant[key]!r} is not one of "
                                        f"{', '.join(map(str, allowed))}")
            for i, qt in enumerate(quant["tensors"]):
                _check_keys(qt, QuantizedTensor, f"{origin}: quantization.tensors[{i}]")
                if qt["bits"] not in (4, 8):
                    raise ManifestError(f"{origin}: quantization.tensors[{i}] bits {qt['bits']!r} is not 4 or 8")
            quant = Quantization(**{**quant, "tensors": [QuantizedTensor(**t) for t in quant["tensors"]]})
        try:
            cfg = ModelConfig.from_dict(d["config"], origin=f"{origin}: config")
        except MtxError as e:
            raise ManifestError(str(e)) from None
        if len(d["layer_outputs"]) != cfg.num_layers:
            raise ManifestError(f"{origin}: layer_outputs has {len(d['layer_outputs'])} entries for "
                                f"{cfg.num_layers} layers")
        return cls(**{**d, "kv": KVSpec(**kv), "inputs": [TensorSpec(**s) for s in d["inputs"]],
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
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.config, origin=MANIFEST)

    def file(self, role: str) -> list[FileEntry]:
        return [f for f in self.files if f.role == role]


_TYPES: dict[str, Any] = {
    "str": str, "int": int, "dict[str, Any]": dict, "list[int | str]": list, "list[int]": list,
    "list[TensorSpec]": list, "list[Fallback]": list, "list[LayerOutput]": list, "list[FileEntry]": list,
    "dict[str, int]": dict, "dict[str, str | None]": dict, "KVSpec": dict,
    "Quantization": dict, "list[QuantizedTensor]": list, "list[str]": list, "bool": bool,
}


def _check_keys(d: Any, cls: type, origin: str) -> None:
    if not isinstance(d, dict):
        raise ManifestError(f"{origin}: expected a JSON object")
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in d]
    extra = sorted(set(d) - set(names))
    if missing:
        raise ManifestError(f"{origin}: missing key {missing[0]!r}")
    if extra:
        raise ManifestError(f"{origin}: unknown key {extra[0]!r}")
    for f in fields(cls):
        value, kind = d[f.name], str(f.type)
        optional = kind.endswith(" | None")
        if value is None and optional:
            continue
        want = _TYPES[kind.removesuffix(" | None")]
        if (isinstance(value, bool) != (want is bool)) or not isinstance(value, want):
            raise ManifestError(f"{origin}: key {f.name!r} must be {kind}, got {value!r}"[:300])


def _choice(d: dict[str, Any], key: str, allowed: tuple[str, ...], origin: str) -> None:
    if d[key] not in allowed:
        raise ManifestError(f"{origin}: {key} {d[key]!r} is not one of {', '.join(allowed)}")


def sha256_file(path: Path, progress=None, chunk: int = 16 << 20) -> str:
    """Hex sha256 of a file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


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
    manifest = Manifest.from_dict(data, origin=str(path))
    for entry in manifest.files:
        f = out_dir / entry.path
        if Path(entry.path).is_absolute() or ".." in Path(entry.path).parts:
            raise ManifestError(f"{path}: file path {entry.path!r} must stay inside the export folder")
        if not f.is_file():
            raise ManifestError(f"{f}: listed in {MANIFEST} but missing")
        if f.stat().st_size != entry.bytes:
            raise ManifestError(f"{f}: {f.stat().st_size} bytes, {MANIFEST} records {entry.bytes}")
        if verify_hashes and sha256_file(f) != entry.sha256:
            raise ManifestError(f"{f}: sha256 differs from {MANIFEST}")
    if not any(e.path == manifest.model and e.role == "model" for e in manifest.files):
        raise ManifestError(f"{path}: model {manifest.model!r} is not listed under files")
    if manifest.engine is not None and not any(e.path == manifest.engine and e.role == "engine"
                                               for e in manifest.files):
        raise ManifestError(f"{path}: engine {manifest.engine!r} is not listed under files with role engine")
    return manifest
