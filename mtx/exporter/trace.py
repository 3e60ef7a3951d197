"""Trace the reference model to ONNX with torch.onnx (dynamo), without touching real weights.

The model is built on the meta device, so tracing a 7B checkpoint costs no weight memory. The result
is an ONNX IR model whose initializers carry the canonical tensor names of
:mod:`mtx.models.checkpoint` (plus ``inv_freq``) and no data yet: :mod:`mtx.exporter.weights` points
them at the checkpoint's bytes or writes converted copies.

Graph interface (docs/ops.md §4): inputs ``input_ids`` [batch, seq] int64, ``start_pos`` [batch]
int64, then ``past_key.{l}``, ``past_value.{l}`` [batch, Hkv, C, D] per layer; outputs ``logits``
[batch, seq, vocab] then ``present_key.{l}``, ``present_value.{l}``. Each attention block is one
``mtx::SlidingWindowGQA`` node and each MoE block one ``mtx::MoE`` node.

Layer outputs: the residual stream of layer ``l`` after attention and after the whole block
([batch, seq, H], dtype T) are plain values of the graph named by :func:`layer_output_names`. They
are traced as extra graph outputs (so torch.onnx names them) and then demoted to intermediate values;
``mtx parity --per-layer`` promotes them again in an in-memory copy (docs/ops.md §5 ``layer_outputs``).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings

import onnx_ir as ir
import torch

from mtx import names
from mtx.config import ModelConfig
from mtx.exporter import functions
from mtx.models.ops import rope_inv_freq
from mtx.models.transformer import Transformer
from mtx.rolling_kv import KVPlan

BATCH, SEQ = "batch", "seq"
INV_FREQ = "inv_freq"


def input_names(num_layers: int) -> list[str]:
    return ["input_ids", "start_pos"] + [f"past_{kv}.{layer}" for layer in range(num_layers) for kv in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present_{kv}.{layer}" for layer in range(num_layers) for kv in ("key", "value")]


def layer_output_names(num_layers: int) -> list[tuple[str, str]]:
    """Per layer: names of the residual stream after attention and after the block (graph values)."""
    return [(f"layers.{layer}.after_attention", f"layers.{layer}.after_block") for layer in range(num_layers)]


class _Traceable(Transformer):
    """``forward_functional`` with flat, interleaved KV buffers (past_key.0, past_value.0, past_key.1, ...),
    returning the per-layer residual streams after the graph outputs (demoted after tracing)."""

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor,  # type: ignore[override]
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        after_attention: list[torch.Tensor] = []
        after_block: list[torch.Tensor] = []
        logits, keys, values = self.forward_functional(input_ids, start_pos, past[0::2], past[1::2],
                                                       hidden_states=after_block, attention_states=after_attention)
        return (logits, *[t for kv in zip(keys, values) for t in kv],
                *[t for pair in zip(after_attention, after_block) for t in pair])


@contextlib.contextmanager
def _quiet():
    """torch.onnx logs and warns on stderr while exporting; the CLI prints its own summary instead."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def trace(cfg: ModelConfig, dtype: torch.dtype, plan: KVPlan) -> ir.Model:
    """Export ``cfg``'s model in ``dtype`` with the KV windows and capacities of ``plan`` (layer l's
    attention node gets ``window = plan.windows[l]``, its buffers ``plan.capacities[l]`` slots) to an ONNX IR model.

    Initializers other than ``inv_freq`` hold meta tensors (no data); ``inv_freq`` is the exact
    float32 RoPE table. The mtx nodes carry no function definitions yet (see
    :func:`attach_functions`). The traced graph depends only on the arguments, not on the target,
    so the last few are kept (they hold no weights) and a fresh clone is returned each time.
    """
    return _trace_cached(cfg, dtype, plan).clone()


@functools.lru_cache(maxsize=4)
def _trace_cached(cfg: ModelConfig, dtype: torch.dtype, plan: KVPlan) -> ir.Model:
    with torch.device("meta"):
        model = _Traceable(cfg)
    model = model.to(dtype).eval().requires_grad_(False)
    for layer, window in zip(model.layers, plan.windows):
        layer.attn.window = window
    model.inv_freq = torch.empty(cfg.head_dim // 2, dtype=torch.float32, device="meta")

    layers = cfg.num_layers
    example_batch, example_seq = 2, 3  # not 0/1, which torch.export would specialise
    ids = torch.zeros(example_batch, example_seq, dtype=torch.long, device="meta")
    start = torch.zeros(example_batch, dtype=torch.long, device="meta")
    past = [torch.zeros((example_batch, cfg.num_kv_heads, c, cfg.head_dim), dtype=dtype, device="meta")
            for c in plan.capacities for _ in range(2)]
    batch, seq = torch.export.Dim(BATCH), torch.export.Dim(SEQ)
    dynamic = ({0: batch, 1: seq}, {0: batch}, [{0: batch}] * (2 * layers))
    probes = [name for pair in layer_output_names(layers) for name in pair]
    with _quiet():
        program = torch.onnx.export(
            model, (ids, start, past), dynamo=True, optimize=False, opset_version=names.OPSET,
            dynamic_shapes=dynamic, input_names=input_names(layers), output_names=output_names(layers) + probes,
            custom_translation_table={torch.ops.mtx.swa_gqa.default: functions.translate_swa_gqa,
                                      torch.ops.mtx.moe.default: functions.translate_moe},
            verbose=False)
    onnx_model = program.model
    _demote_outputs(onnx_model.graph, probes)
    inv = onnx_model.graph.initializers[INV_FREQ]
    table = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_linear_factor)
    inv.const_value = ir.tensor(table.numpy(), name=INV_FREQ)
    _name_dims(onnx_model.graph)
    onnx_model.producer_name = "mtx"
    return onnx_model


def _demote_outputs(graph: ir.Graph, names: list[str]) -> None:
    """Remove the outputs ``names`` from the graph's outputs; they stay as named intermediate values."""
    by_name = {v.name: v for v in graph.outputs}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise AssertionError(f"torch.onnx did not name the traced output {missing[0]!r}")
    for name in names:
        value = by_name[name]
        graph.outputs.remove(value)
        if value.producer() is None:
            raise AssertionError(f"layer output {name!r} is not computed by a node of the graph")
        value.shape = ir.Shape([ir.SymbolicDim(BATCH), ir.SymbolicDim(SEQ), value.shape[2]])


def _name_dims(graph: ir.Graph) -> None:
    """Make sure the dynamic axes are called ``batch`` and ``seq`` on every graph input and output."""
    for value in (*graph.inputs, *graph.outputs):
        dims = list(value.shape)
        dims[0] = ir.SymbolicDim(BATCH)
        if value.name in ("input_ids", "logits"):
            dims[1] = ir.SymbolicDim(SEQ)
        value.shape = ir.Shape(dims)


def attach_functions(model: ir.Model) -> None:
    """Add the standard-op function bodies of the mtx ops that the graph still uses."""
    used = {n.op_type for n in model.graph if n.domain == names.DOMAIN}
    for proto in functions.function_protos():
        if proto.name in used:
            fn = ir.serde.deserialize_function(proto)
            model.functions[fn.identifier()] = fn
    if used:
        model.opset_imports[names.DOMAIN] = names.DOMAIN_VERSION
    else:
        model.opset_imports.pop(names.DOMAIN, None)


def count_ops(model: ir.Model) -> dict[str, int]:
    """Node counts by ``domain::op_type`` in the main graph (default domain written as ``ai.onnx``)."""
    counts: dict[str, int] = {}
    for node in model.graph:
        key = f"{node.domain or 'ai.onnx'}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts
