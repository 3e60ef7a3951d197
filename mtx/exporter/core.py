"""``mtx export``: checkpoint -> folder with model.onnx, external weights, mtx.json, tokenizer files.

The folder is assembled in a temporary sibling of OUT and renamed into place only when complete,
so a failure (bad input, a full disk, Ctrl-C) leaves nothing behind. Weights are never held in RAM
twice: the model is traced on the meta device and tensors are linked or streamed one at a time
(:mod:`mtx.exporter.weights`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

import mtx
from mtx import rolling_kv
from mtx.assets import resolve_checkpoint
from mtx.config import ModelConfig
from mtx.errors import MtxError, UsageError
from mtx.exporter import functions, ort_lowering, trace, weights
from mtx.exporter.manifest import (DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, TARGETS, Fallback, FileEntry, KVSpec,
                                   Manifest, TensorSpec, sha256_file, write_manifest)
from mtx.models.checkpoint import DTYPE_NAMES, Checkpoint

MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.engine"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model")


class ExportError(MtxError):
    """The export itself failed (not bad input): e.g. the written model does not pass the ONNX checker."""

    exit_code = 1


@dataclass(frozen=True)
class ExportOptions:
    """Options of ``mtx export`` (see ``mtx export --help``)."""

    target: str = "onnxruntime"
    dtype: str = "float32"
    cache_capacity: int | None = None  # default: the sliding window, or max_position_embeddings
    max_batch: int = 1
    max_position: int | None = None  # onnxruntime target: rows of the rotary tables
    force: bool = False

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise UsageError(f"--target: unknown target {self.target!r}; expected one of {', '.join(TARGETS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype: unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        for opt, value in (("--cache-capacity", self.cache_capacity), ("--max-batch", self.max_batch),
                           ("--max-position", self.max_position)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{opt}: expected a positive integer, got {value!r}")


class Progress:
    """Where the exporter reports long work. The default reports nothing."""

    def task(self, description: str, total: int) -> Callable[[int], None]:
        """Start a task of ``total`` units (bytes); returns a function that advances it."""
        return lambda n: None

    def stage(self, description: str) -> None:
        """A step without a measurable size (tracing, checking)."""


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    notes: list[str] = field(default_factory=list)  # fallbacks and engine status, one line each


# --------------------------------------------------------------------------------------------------
# Output folder


def _check_out(out: Path, force: bool) -> None:
    """Refuse to replace anything without --force, and never replace a file with a folder."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"-o {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        what = "an mtx export" if (out / MANIFEST).is_file() else "a folder that is not an mtx export (no mtx.json)"
        raise UsageError(f"-o {out}: already exists and is {what}; pass --force to replace it")


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out``; removed (with any parents created for it) unless committed."""
    created: list[Path] = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for p in reversed(created):
        p.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; a previous export (checked by _check_out) is removed after."""
    if out.is_dir():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)


# --------------------------------------------------------------------------------------------------
# Export


def _capacity(cfg: ModelConfig, requested: int | None) -> int:
    capacity = requested or rolling_kv.default_capacity(cfg.sliding_window, cfg.max_position_embeddings)
    if cfg.sliding_window and capacity < cfg.sliding_window:
        raise UsageError(f"--cache-capacity: {capacity} is smaller than the model's sliding window "
                         f"{cfg.sliding_window}; need a capacity >= the window")
    return capacity


def _layers_of(model: ir.Model, op: str) -> list[int]:
    """Layer numbers of the mtx nodes ``op`` still in the graph (from the present_key output / order)."""
    return [i for i, n in enumerate(n for n in model.graph if n.domain == functions.DOMAIN and n.op_type == op)]


def _dtype_name(dtype: ir.DataType) -> str:
    return {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
            ir.DataType.INT64: "int64", ir.DataType.INT32: "int32"}[dtype]


def _versions() -> dict[str, str | None]:
    import onnxscript

    versions: dict[str, str | None] = {"mtx": mtx.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                                       "onnxscript": onnxscript.__version__, "onnx_ir": ir.__version__}
    for name in ("onnxruntime", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def _validate_onnx(path: Path) -> None:
    """onnx.checker (full check, on the saved path, external data included) and strict shape inference."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path}: the exported model fails the ONNX checker: {str(e).strip().splitlines()[0]}") \
            from e


def _build_engine(onnx_path: Path, out_dir: Path, options: ExportOptions, capacity: int) -> tuple[str | None, str]:
    """Build the TensorRT engine if TensorRT and the mtx plugins are present: (engine file, status line)."""
    try:
        from mtx import tensorrt as mtx_tensorrt  # provided by the kernels work (TensorRT plugins)
    except ImportError as e:
        return None, f"not built: mtx.tensorrt is not part of this installation ({e})"
    ok, reason = mtx_tensorrt.available()
    if not ok:
        return None, f"not built: {reason}"
    mtx_tensorrt.build_engine(onnx_path, out_dir / ENGINE_FILE, max_batch=options.max_batch, max_seq=capacity,
                              dtype=options.dtype)
    return ENGINE_FILE, "built"


def export(checkpoint: str | Path | None, out: str | Path, options: ExportOptions = ExportOptions(),
           progress: Progress | None = None) -> ExportResult:
    """Export ``checkpoint`` (folder, ``builtin:NAME`` or None for the built-in model) into folder ``out``.

    Raises :class:`mtx.errors.MtxError` on bad options or checkpoints (nothing is written then).
    """
    progress = progress or Progress()
    options.validate()
    out = Path(out)
    _check_out(out, options.force)
    ck = Checkpoint(resolve_checkpoint(checkpoint))
    cfg = ck.config
    dtype = DTYPE_NAMES[options.dtype]
    capacity = _capacity(cfg, options.cache_capacity)
    window = cfg.sliding_window or 0
    notes: list[str] = []

    with _staging(out) as tmp:
        progress.stage(f"tracing {cfg.num_layers} layers with torch.onnx (dynamo)")
        model = trace.trace(cfg, dtype, capacity)

        fallbacks: list[Fallback] = []
        local_window_size = None
        max_position = None
        attention_op, moe_op = f"{functions.DOMAIN}::{functions.ATTENTION_OP}", (
            f"{functions.DOMAIN}::{functions.MOE_OP}" if cfg.is_moe else None)
        kv = KVSpec("ring", "shared" if options.target == "tensorrt" else "separate", "any")
        if options.target == "onnxruntime":
            progress.stage("checking ONNX Runtime's contrib ops against the reference")
            plan = ort_lowering.plan(dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, bool(window),
                                     cfg.num_experts, cfg.num_experts_per_tok)
            max_position = options.max_position or (cfg.max_position_embeddings if window else capacity)
            if not window and max_position < capacity:
                raise UsageError(f"--max-position: {max_position} is below the KV capacity {capacity} of this "
                                 f"full-attention model")
            for op, cap in ((functions.ATTENTION_OP, plan.attention), (functions.MOE_OP, plan.moe)):
                if cap is not None and not cap.ok:
                    fallbacks.append(Fallback(f"{functions.DOMAIN}::{op}", _layers_of(model, op), cap.reason))
            ort_lowering.lower(model, dtype=dtype, window_offset=plan.window_offset or 0, max_position=max_position,
                               attention=plan.attention.ok, moe=bool(plan.moe and plan.moe.ok),
                               load=lambda name: ck.load(name, dtype))
            if plan.attention.ok:
                attention_op = f"{ort_lowering.MS_DOMAIN}::GroupQueryAttention"
                local_window_size = plan.local_window_size(window)
                kv = KVSpec("ort_window" if window else "ring", "shared", "first_call_only")
            else:
                max_position = None
            if plan.moe is not None and plan.moe.ok:
                moe_op = f"{ort_lowering.MS_DOMAIN}::MoE"
            for fb in fallbacks:
                notes.append(f"fallback: {fb.op} kept with its ONNX function body in layers "
                             f"{_ranges(fb.layers)}: {fb.reason}")
        trace.attach_functions(model)

        report = weights.attach_weights(model, ck, dtype, tmp, progress)
        model.ir_version = ort_lowering.IR_VERSION
        model.doc_string = f"mtx export of {ck.root.name} (target {options.target}); see mtx.json"
        onnx_path = tmp / MODEL_FILE
        ir.save(model, onnx_path)
        progress.stage("checking the model (onnx.checker full check, shape inference)")
        _validate_onnx(onnx_path)

        roles: dict[str, str] = {MODEL_FILE: "model"}
        if report.written:
            roles[weights.DATA_FILE] = "weights"
        roles.update({name: "checkpoint-weights" for name in report.files})
        for name in TOKENIZER_FILES:
            if (ck.root / name).is_file():
                shutil.copyfile(ck.root / name, tmp / name)
                roles[name] = "tokenizer"

        engine, engine_status = None, "not applicable (target is not tensorrt)"
        if options.target == "tensorrt":
            progress.stage("building the TensorRT engine")
            engine, engine_status = _build_engine(onnx_path, tmp, options, capacity)
            if engine:
                roles[engine] = "engine"
            notes.append(f"engine: {engine_status}")

        hashed = progress.task("sha256", sum((tmp / n).stat().st_size for n in roles if n not in report.sha256))
        files = [FileEntry(n, role, (tmp / n).stat().st_size, report.sha256.get(n) or sha256_file(tmp / n, hashed))
                 for n, role in roles.items()]
        manifest = Manifest(
            format=FORMAT, format_version=FORMAT_VERSION, target=options.target, model=MODEL_FILE,
            dtype=options.dtype, config=cfg.to_dict(), window=window, capacity=capacity, max_batch=options.max_batch,
            max_position=max_position, kv=kv,
            inputs=[TensorSpec(v.name, _dtype_name(v.dtype), _dims(v)) for v in model.graph.inputs],
            outputs=[TensorSpec(v.name, _dtype_name(v.dtype), _dims(v)) for v in model.graph.outputs],
            ops=trace.count_ops(model), attention_op=attention_op, moe_op=moe_op, local_window_size=local_window_size,
            fallbacks=fallbacks, engine=engine, engine_status=engine_status,
            checkpoint={"path": str(ck.root.resolve()), "format": cfg.source_format,
                        "dtype": str(ck.dtype).removeprefix("torch.")},
            weights={"referenced_bytes": report.referenced_bytes, "written_bytes": report.written_bytes,
                     "referenced_tensors": report.referenced, "written_tensors": report.written,
                     "checkpoint_files": report.files},
            versions=_versions(), files=files)
        write_manifest(tmp, manifest)
        _commit(tmp, out)
    return ExportResult(out, manifest, notes)


def _dims(value: ir.Value) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) \
        else ", ".join(map(str, layers))


__all__ = ["ExportError", "ExportOptions", "ExportResult", "Progress", "export"]
