"""Lower the mtx nodes to ONNX Runtime contrib ops (the graph rewrite of the onnxruntime target).

``mtx::SlidingWindowGQA`` becomes ``com.microsoft.GroupQueryAttention`` (rotary from cos/sin
tables of ``max_position`` rows, windowed KV cache) and ``mtx::MoE`` becomes ``com.microsoft.MoE``
(interleaved SwiGLU). Which blocks are lowered, and the ``local_window_size`` convention, are
decided by :mod:`mtx.exporter.ort_probes`, which runs these lowerings on the installed ORT.

* With ``sliding_window_cache = 1`` the buffers hold ORT's own layout (rows ``[0, L)`` hold the most
  recent positions in order), not slot ``p mod C``; a call with ``seq > 1`` after the first needs
  ``batch == 1``.
* ORT's MoE applies softmax to ``router_probs`` itself (it takes logits) and breaks top-k ties towards
  the higher expert index. To keep the spec's routing (float32 softmax, ties to the lower index) the
  lowering computes the routing itself and hands ORT ``log(w)`` for the chosen experts and ``-inf``
  for the others: ORT's softmax, top-k and renormalisation then reproduce exactly those weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch

from mtx import names
from mtx.exporter.weights import lazy

MS_DOMAIN = "com.microsoft"
ROPE_COS, ROPE_SIN = "rope_cos_cache", "rope_sin_cache"
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; 10 is what torch.onnx writes


def fc1_name(w1_name: str) -> str:
    """Name of the interleaved [E, 2I, H] gate/up initializer made from ``...moe.w1`` and ``...moe.w3``."""
    return w1_name.removesuffix(".w1") + ".fc1_swiglu_interleaved"


def interleave_swiglu(load: Callable[[str], torch.Tensor], w1_name: str, w3_name: str) -> torch.Tensor:
    """[E, I, H] gate (w1) and up (w3) projections -> [E, 2I, H] with rows 2i = w1[i], 2i+1 = w3[i].

    The two are loaded one after the other, so at most the result and one input are in memory.
    """
    w1 = load(w1_name)
    out = torch.empty((w1.shape[0], 2 * w1.shape[1], *w1.shape[2:]), dtype=w1.dtype)
    out[:, 0::2] = w1
    del w1
    out[:, 1::2] = load(w3_name)
    return out


def rope_tables(inv_freq: torch.Tensor, rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [rows, D/2] of angles float32(p) * inv_freq for p < rows, computed in float32, cast to dtype."""
    angles = torch.arange(rows, dtype=torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


# --------------------------------------------------------------------------------------------------
# Graph rewriting


def _attr(node: ir.Node, name: str):
    return node.attributes[name].value


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    """Register ``tensor`` (e.g. a lazy one) as initializer ``name`` of ``graph``; returns its value."""
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def lower(model: ir.Model, *, dtype: torch.dtype, window_offset: int, max_position: int,
          attention: bool, moe: bool, load: Callable[[str], torch.Tensor]) -> None:
    """Rewrite the mtx nodes of ``model`` in place (those selected by ``attention`` / ``moe``).

    ``window_offset`` is what :func:`window_offset` found (``local_window_size = W - offset``);
    ``max_position`` the rows of the rotary tables; ``load(name)`` returns a canonical weight in
    ``dtype`` (used lazily, when the interleaved expert weights are written).
    """
    graph = model.graph
    shared: dict[str, ir.Value] = {}
    rope: dict[str, ir.Value] = {}
    for node in list(graph):
        if node.domain != names.DOMAIN:
            continue
        if node.op_type == names.ATTENTION_OP and attention:
            _lower_attention(graph, node, shared, rope, dtype, window_offset, max_position)
        elif node.op_type == names.MOE_OP and moe:
            _lower_moe(graph, node, dtype, load)
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
        graph.initializers.pop(name)
    model.opset_imports[MS_DOMAIN] = 1


def _lower_attention(graph: ir.Graph, node: ir.Node, shared: dict[str, ir.Value], rope: dict[str, ir.Value],
                     dtype: torch.dtype, window_offset: int, max_position: int) -> None:
    query, key, value, past_key, past_value, start_pos, inv_freq = node.inputs
    tape = ir.tape.Tape()
    if "seqlens_k" not in shared:
        # seqlens_k[b] = start_pos[b] + S - 1 and total = max_b(start_pos[b] + S), int32 (ORT's "M").
        seq = tape.op("Shape", [query], {"start": 1, "end": 2})
        end = tape.op("Add", [start_pos, seq])
        one = tape.op("Constant", [], {"value_ints": [1]})
        shared["seqlens_k"] = tape.op("Cast", [tape.op("Sub", [end, one])], {"to": ir.DataType.INT32})
        total = tape.op("ReduceMax", [end], {"keepdims": 0})
        shared["total"] = tape.op("Cast", [total], {"to": ir.DataType.INT32})
        for v, n in ((shared["seqlens_k"], "seqlens_k"), (shared["total"], "total_sequence_length")):
            v.name = n
    if not rope:
        inv = inv_freq.const_value
        inv_t = torch.from_numpy(np.asarray(inv.numpy()).copy())
        half = inv_t.shape[0]
        for i, name in enumerate((ROPE_COS, ROPE_SIN)):
            rope[name] = add_initializer(graph, name, lazy(
                name, (max_position, half), dtype, lambda i=i: rope_tables(inv_t, max_position, dtype)[i]))
    window = _attr(node, "window")
    attrs: dict[str, object] = {"num_heads": _attr(node, "num_heads"), "kv_num_heads": _attr(node, "num_kv_heads"),
                                "scale": float(_attr(node, "scale")), "do_rotary": 1, "rotary_interleaved": 0}
    if window > 0:
        attrs.update(local_window_size=window - window_offset, sliding_window_cache=1)
    outputs = tape.op_multi_out(
        "GroupQueryAttention",
        [query, key, value, past_key, past_value, shared["seqlens_k"], shared["total"], rope[ROPE_COS], rope[ROPE_SIN]],
        attrs, num_outputs=3, domain=MS_DOMAIN)
    ir.convenience.replace_nodes_and_values(graph, node, [node], tape.nodes, node.outputs, outputs)


def _lower_moe(graph: ir.Graph, node: ir.Node, dtype: torch.dtype, load: Callable[[str], torch.Tensor]) -> None:
    x, router, w1, w3, w2 = node.inputs
    top_k = _attr(node, "top_k")
    e, i, h = (int(d) for d in w1.shape)
    name = fc1_name(w1.name)
    if name in graph.initializers:
        fc1 = graph.initializers[name]
    else:
        w1_name, w3_name = w1.name, w3.name
        fc1 = add_initializer(graph, name, lazy(name, (e, 2 * i, h), dtype,
                                                 lambda: interleave_swiglu(load, w1_name, w3_name)))
    tape = ir.tape.Tape()
    # Routing per docs/ops.md §3 (float32 softmax, top-k with ties to the lower index, renormalise) ...
    hidden = tape.op("Shape", [x], {"start": -1})
    rows = tape.op("Concat", [tape.op("Constant", [], {"value_ints": [-1]}), hidden], {"axis": 0})
    logits = tape.op("MatMul", [tape.op("Reshape", [x, rows]), tape.op("Transpose", [router], {"perm": [1, 0]})])
    probs = tape.op("Softmax", [tape.op("Cast", [logits], {"to": ir.DataType.FLOAT})], {"axis": -1})
    k = tape.op("Constant", [], {"value_ints": [top_k]})
    top_p, top_e = tape.op_multi_out("TopK", [probs, k], {"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
    total = tape.op("ReduceSum", [top_p, tape.op("Constant", [], {"value_ints": [-1]})], {"keepdims": 1})
    log_w = tape.op("Log", [tape.op("Div", [top_p, total])])
    minus_inf = tape.op("Expand", [tape.op("Constant", [], {"value_float": -math.inf}), tape.op("Shape", [probs])])
    # ... handed to ORT as logits: log(w) for the chosen experts, -inf elsewhere.
    route = tape.op("CastLike", [tape.op("ScatterElements", [minus_inf, top_e, log_w], {"axis": 1}), x])
    out = tape.op("MoE", [x, route, fc1, None, w2],
                  {"k": top_k, "activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0,
                   "activation_beta": 0.0, "normalize_routing_weights": 1, "use_sparse_mixer": 0},
                  domain=MS_DOMAIN)
    ir.convenience.replace_nodes_and_values(graph, node, [node], tape.nodes, node.outputs, [out])
