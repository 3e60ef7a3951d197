"""``mtx export``: checkpoint -> folder with model.onnx, external weights, mtx.json, tokenizer files.

The folder is assembled in a temporary sibling of OUT and renamed into place only when complete,
so a failure (bad input, a full disk, Ctrl-C) leaves nothing behind (:mod:`mtx.exporter.output`). Weights are never held in RAM
twice: the model is traced on the meta device and tensors are linked or streamed one at a time
(:mod:`mtx.exporter.weights`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

import mtx
from mtx import names, rolling_kv
from mtx.assets import resolve_checkpoint
from mtx.config import GENERATION_CONFIG
from mtx.errors import MtxError, UsageError
from mtx.exporter import ort_fusions, ort_lowering, ort_probes, output, quantized, trace, weights
from mtx.manifest import (FORMAT, FORMAT_VERSION, Fallback, FileEntry, KVLayer, KVSpec, LayerOutput, Manifest,
                          Quantization, TensorSpec, sha256_file, summarize_layers, write_manifest)
from mtx.exporter.polygraphy_loader import DATA_LOADER_FILE, write_data_loader
from mtx.exporter.options import ExportOptions, check_out
from mtx.exporter.progress import Progress
from mtx.models.checkpoint import Checkpoint, check_finite
from mtx.names import onnx_dtype_name, torch_dtype
from mtx.tokenizer import check_side_files, tokenizer_files

MODEL_FILE = "model.onnx"
ENGINE_FILE = "model.engine"


class ExportError(MtxError):
    """The export itself failed (not bad input): e.g. the written model does not pass the ONNX checker."""

    exit_code = 1


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    notes: list[str] = field(default_factory=list)  # fallbacks and engine status, one line each


# --------------------------------------------------------------------------------------------------
# Export


def _layers_of(model: ir.Model, op: str) -> list[int]:
    """Layer numbers of the mtx nodes ``op`` (one per layer, in graph order, so the n-th is layer n)."""
    return [i for i, n in enumerate(n for n in model.graph if n.domain == names.DOMAIN and n.op_type == op)]


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


def _build_engine(onnx_path: Path, out_dir: Path, options: ExportOptions) -> tuple[str | None, str]:
    """Build the TensorRT engine if TensorRT and the mtx plugins are present: (engine file, status line).

    The profile spans batch 1 .. --max-batch (optimised for the full batch); ``seq`` keeps
    mtx.tensorrt's default range. mtx.tensorrt loads the plugin library before parsing, so the
    parser maps the mtx nodes to the plugins rather than to their function bodies.
    """
    try:
        from mtx import tensorrt as mtx_tensorrt  # the TensorRT plugins' Python side (kernels work)
        from mtx.exporter.tensorrt_engine import build_engine
    except ImportError as e:
        return None, f"not built: mtx.tensorrt is not part of this installation ({e})"
    ok, reason = mtx_tensorrt.available()
    if not ok:
        return None, f"not built: {reason}"
    build_engine(onnx_path, out_dir / ENGINE_FILE, dtype=options.dtype,
                 batch=(1, options.max_batch, options.max_batch))
    return ENGINE_FILE, "built"


@dataclass
class _GraphPlan:
    """How the target shaped the graph: what the manifest reports about ops and KV buffers."""

    attention_op: str
    moe_op: str | None
    kv: KVSpec
    max_position: int | None = None
    local_window_sizes: list[int | None] = field(default_factory=list)  # per layer, empty: none
    fallbacks: list[Fallback] = field(default_factory=list)
    quantization: Quantization | None = None


def _shape_graph(model: ir.Model, ck: Checkpoint, dtype: torch.dtype, options: ExportOptions,
                 max_position: int, kv_plan: rolling_kv.KVPlan, progress: Progress) -> _GraphPlan:
    """Lower to ONNX Runtime contrib ops (onnxruntime target) and attach the function bodies still needed.
    Each layer's attention follows its own window (``kv_plan.windows``)."""
    cfg = ck.config
    windowed = tuple(bool(w) for w in kv_plan.windows)
    mtx_attention, mtx_moe = f"{names.DOMAIN}::{names.ATTENTION_OP}", f"{names.DOMAIN}::{names.MOE_OP}"
    plan = _GraphPlan(mtx_attention, mtx_moe if cfg.is_moe else None,
                      KVSpec("ring", "shared" if options.target == "tensorrt" else "separate", "any"))
    if options.target == "onnxruntime":
        progress.stage("checking ONNX Runtime's contrib ops against the reference")
        ort = ort_probes.plan(dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, windowed,
                              cfg.num_experts, cfg.num_experts_per_tok)
        for op, cap in ((names.ATTENTION_OP, ort.attention), (names.MOE_OP, ort.moe)):
            if cap is not None and not cap.ok:
                plan.fallbacks.append(Fallback(f"{names.DOMAIN}::{op}", _layers_of(model, op), cap.reason))
        lower_moe = ort.moe is not None and ort.moe.ok
        ort_lowering.lower(model, dtype=dtype, window_offset=ort.window_offset or 0, max_position=max_position,
                           attention=ort.attention.ok, moe=lower_moe, load=lambda name: ck.load(name, dtype))
        ort_fusions.fuse(model, dtype, lambda name: ck.load(name, dtype))
        if ort.attention.ok:
            plan.attention_op = f"{ort_lowering.MS_DOMAIN}::GroupQueryAttention"
            plan.local_window_sizes = [ort.local_window_size(w) for w in kv_plan.windows]
            plan.max_position = max_position
            plan.kv = KVSpec("ort_window" if all(windowed) else "ring" if not any(windowed) else "per_layer",
                             "shared", "first_call_only")
        if lower_moe:
            plan.moe_op = f"{ort_lowering.MS_DOMAIN}::MoE"
    uses_dq = False
    spec = options.quant_spec
    if spec is not None:
        progress.stage(f"quantising weights to {spec.bits} bits, blocks of {spec.block_size} ({spec.scheme})")

        def load(name: str) -> torch.Tensor:
            t = ck.load(name, dtype)
            if not options.allow_nonfinite:
                check_finite(name, t, ck.sources[name].refs[0])
            return t

        if options.target == "onnxruntime":  # quantised weights are written anyway: one MatMulNBits for gate+up
            ort_fusions.pack_gate_up(model, dtype, load)
        qplan = quantized.quantize_graph(model, target=options.target, dtype=dtype, spec=spec,
                                         accuracy_level=options.accuracy_level, lm_head=options.quantize_lm_head,
                                         load=load, checkpoint_names=set(ck.sources),
                                         lm_head_bits=options.lm_head_bits,
                                         embedding_bits=options.embedding_bits if options.quantize_embedding else None)
        plan.fallbacks += [Fallback(fb.op, _layers_of_ms(model, "MoE"), fb.reason) for fb in qplan.fallbacks]
        if plan.moe_op == f"{ort_lowering.MS_DOMAIN}::MoE" and any(t.op.endswith("::QMoE") for t in qplan.tensors):
            plan.moe_op = f"{ort_lowering.MS_DOMAIN}::QMoE"
        plan.quantization = quantized.manifest_entry(qplan, spec, options.target, options.accuracy_level)
        uses_dq = qplan.uses_dq
    trace.attach_functions(model)
    if uses_dq:
        quantized.set_dq_opset(model)
    return plan


def _layers_of_ms(model: ir.Model, op: str) -> list[int]:
    """Layer numbers of the com.microsoft nodes ``op`` (one per layer, in graph order)."""
    return [i for i, _ in enumerate(n for n in model.graph if n.domain == ort_lowering.MS_DOMAIN and n.op_type == op)]


def export(checkpoint: str | Path | None, out: str | Path, options: ExportOptions = ExportOptions(),
           progress: Progress | None = None) -> ExportResult:
    """Export ``checkpoint`` (folder, ``builtin:NAME`` or None for the built-in model) into folder ``out``.

    Raises :class:`mtx.errors.MtxError` on bad options or checkpoints (checked before anything is
    written); any failure removes the partial output.
    """
    progress = progress or Progress()
    options.validate()
    out = Path(out)
    check_out(out, options.force)
    ck = Checkpoint(resolve_checkpoint(checkpoint))
    if out.resolve() == ck.root.resolve() or out.resolve() in ck.root.resolve().parents:
        raise UsageError(f"out {out}: would replace the checkpoint folder {ck.root}; choose another output folder",
                         params=("out",))
    cfg = ck.config
    dtype = torch_dtype(options.dtype)
    kv_plan = rolling_kv.plan_kv(cfg.windows, cfg.max_position_embeddings, options.cache_capacity)
    context = kv_plan.context_limit(None)  # the full-attention layers' capacity (rule 8), None if unbounded
    max_position = options.max_position or context or cfg.max_position_embeddings
    if context is not None and max_position < context:
        raise UsageError(f"max_position: {max_position} is below the KV capacity {context} of this "
                         f"model's full-attention layers", params=("max_position",))
    # a malformed tokenizer, chat template or generation config fails now, not at load
    tokenizer_mode = check_side_files(ck.root, cfg.eos_token_ids, options.tokenizer_mode)

    with output.staging(out) as tmp:
        progress.stage(f"tracing {cfg.num_layers} layers with torch.onnx (dynamo)")
        model = trace.trace(cfg, dtype, kv_plan)
        plan = _shape_graph(model, ck, dtype, options, max_position, kv_plan, progress)
        notes = [f"fallback: {fb.op} kept with its ONNX function body in layers {_ranges(fb.layers)}: {fb.reason}"
                 for fb in plan.fallbacks]
        report = weights.attach_weights(model, ck, dtype, tmp, progress, options.allow_nonfinite)
        onnx_path = _save_model(model, tmp, f"mtx export of {ck.root.name} (target {options.target}); see mtx.json",
                                progress)
        roles = _copy_side_files(model, ck, tmp, report, kv_plan, options.dtype, notes, tokenizer_mode)
        engine, engine_status = None, "not applicable (target is not tensorrt)"
        if options.target == "tensorrt":
            progress.stage("building the TensorRT engine")
            engine, engine_status = _build_engine(onnx_path, tmp, options)
            if engine:
                roles[engine] = "engine"
            notes.append(f"engine: {engine_status}")

        hashed = progress.task("sha256", sum((tmp / n).stat().st_size for n in roles if n not in report.sha256))
        files = [FileEntry(n, role, (tmp / n).stat().st_size, report.sha256.get(n) or sha256_file(tmp / n, hashed))
                 for n, role in roles.items()]
        lws = plan.local_window_sizes or [None] * cfg.num_layers
        layouts = [("ort_window" if w else "ring") if plan.kv.layout == "per_layer" else plan.kv.layout
                   for w in kv_plan.windows]
        layers = [KVLayer(w, c, lay, s) for w, c, lay, s in zip(kv_plan.windows, kv_plan.capacities, layouts, lws)]
        summary = summarize_layers(layers)
        manifest = Manifest(
            format=FORMAT, format_version=FORMAT_VERSION, target=options.target, model=MODEL_FILE,
            dtype=options.dtype, config=cfg.to_dict(), window=summary["window"], capacity=summary["capacity"],
            layers=layers, max_batch=options.max_batch,
            max_position=plan.max_position, kv=plan.kv,
            inputs=[TensorSpec(v.name, onnx_dtype_name(v.dtype), _dims(v)) for v in model.graph.inputs],
            outputs=[TensorSpec(v.name, onnx_dtype_name(v.dtype), _dims(v)) for v in model.graph.outputs],
            ops=trace.count_ops(model), attention_op=plan.attention_op, moe_op=plan.moe_op,
            local_window_size=summary["local_window_size"], fallbacks=plan.fallbacks,
            layer_outputs=_layer_outputs(model, cfg.num_layers), quantization=plan.quantization, engine=engine,
            engine_status=engine_status,
            checkpoint={"path": str(ck.root.resolve()), "format": cfg.source_format,
                        "dtype": str(ck.dtype).removeprefix("torch.")},
            weights=report.manifest_entry(), versions=_versions(), files=files)
        write_manifest(tmp, manifest)
        output.commit(tmp, out, options.force)
    return ExportResult(out, manifest, notes)


def _save_model(model: ir.Model, folder: Path, doc: str, progress: Progress) -> Path:
    """Write ``folder/model.onnx`` (external data already attached) and validate it."""
    model.ir_version = ort_lowering.IR_VERSION
    model.doc_string = doc
    onnx_path = folder / MODEL_FILE
    ir.save(model, onnx_path)
    progress.stage("checking the model (onnx.checker full check, shape inference)")
    _validate_onnx(onnx_path)
    return onnx_path


def _copy_side_files(model: ir.Model, ck: Checkpoint, folder: Path, report: weights.WeightReport,
                     kv_plan: rolling_kv.KVPlan,
                     dtype: str, notes: list[str], tokenizer_mode: str) -> dict[str, str]:
    """Copy the tokenizer files of ``tokenizer_mode`` (mtx.tokenizer.tokenizer_files) and write the
    Polygraphy data loader; the role of every file so far.

    A tokenizer file that is a symlink to a file outside the checkpoint folder (the Hugging Face cache
    is laid out so) is copied, and a note says what was followed.
    """
    roles: dict[str, str] = {MODEL_FILE: "model"}
    if report.written:
        roles[weights.DATA_FILE] = "weights"
    roles.update({name: "checkpoint-weights" for name in report.files})
    inside = ck.root.resolve()
    for name, src in tokenizer_files(ck.root, tokenizer_mode).items():
        target = src.resolve()
        if src.is_symlink() and inside not in target.parents:
            notes.append(f"{src.name}: copied from {target}, the target of a symlink outside the checkpoint folder")
        shutil.copyfile(target, folder / name)
        roles[name] = "tokenizer"
    if tokenizer_mode == "mistral":
        mistral = next(n for n in roles if roles[n] == "tokenizer" and n != GENERATION_CONFIG)
        notes.append(f"tokenizer: {mistral}, Mistral's own, read with mistral_common (chat prompts: "
                     f"encode_chat_completion)")
    cfg = ck.config
    kv_shapes = {v.name: (1, *[int(d) for d in v.shape[1:]]) for v in model.graph.inputs if v.name.startswith("past_")}
    write_data_loader(folder, vocab_size=cfg.vocab_size, capacity=min(kv_plan.capacities), dtype=dtype,
                      kv_shapes=kv_shapes)
    roles[DATA_LOADER_FILE] = "tooling"
    return roles


def _layer_outputs(model: ir.Model, num_layers: int) -> list[LayerOutput]:
    """The per-layer residual-stream values (traced by name, docs/ops.md §5), checked to be in the final graph."""
    produced = {v.name for node in model.graph for v in node.outputs}
    entries = []
    for layer, (attention, block) in enumerate(trace.layer_output_names(num_layers)):
        for name in (attention, block):
            if name not in produced:
                raise ExportError(f"layer output {name!r} is missing from the {model.graph.name or 'main'} graph "
                                  f"after lowering")
        entries.append(LayerOutput(layer, attention, block))
    return entries


def _dims(value: ir.Value) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) \
        else ", ".join(map(str, layers))


__all__ = ["ExportError", "ExportOptions", "ExportResult", "Progress", "export"]
