"""The two mtx ops in ONNX: node translations for torch.onnx and their standard-op function bodies.

``translate_swa_gqa`` / ``translate_moe`` are the torch.onnx custom translations of
``torch.ops.mtx.swa_gqa`` / ``torch.ops.mtx.moe``: each puts one ``mtx::SlidingWindowGQA`` /
``mtx::MoE`` node into the graph. ``SlidingWindowGQA`` and ``MoE`` below are onnxscript functions
(domain ``mtx``, version 1) that define those ops with standard ONNX ops only (default domain,
opset :data:`mtx.names.OPSET`); :func:`mtx.exporter.trace.attach_functions` adds them to the model as
model-local functions after tracing (torch.onnx's version conversion would inline functions present
during export), so any ONNX runtime can run the graph unmodified. The bodies implement docs/ops.md
§1-§3:

* attention reads the buffer as held *before* the call plus the chunk's own keys, then writes the
  last ``min(S, C)`` chunk tokens to slots ``p mod C`` (rule 5-6); RoPE from ``inv_freq`` in float32;
  scores, softmax and the weighted sum in float32; query head ``h`` uses KV head ``h div G``;
* MoE: router logits in ``T``, softmax in float32, TopK (ties to the lower index), renormalise in
  float32, SwiGLU experts. The body evaluates every expert densely and keeps the selected ones
  (exactly the spec's sum; it is the portable fallback, not a fast kernel).

``num_heads``/``num_kv_heads`` are read from the input shapes inside the bodies; the attributes are
kept on the nodes for the TensorRT plugins. ``plugin_version`` and ``plugin_namespace`` are declared
so that the TensorRT ONNX parser finds the ``mtx`` plugins.
"""

from __future__ import annotations

from typing import Tuple, TypeVar, Union

import onnx
import onnxscript
from onnxscript import BFLOAT16, FLOAT, FLOAT16, INT64
from onnxscript import opset18 as op

from mtx.names import ATTENTION_OP, DOMAIN, DOMAIN_VERSION, MOE_OP, OPSET, PLUGIN_NAMESPACE, PLUGIN_VERSION

assert OPSET == 18, "the function bodies are written against onnxscript's opset18"

mtx_opset = onnxscript.values.Opset(DOMAIN, DOMAIN_VERSION)

_INT64_ZERO = onnx.helper.make_tensor("", onnx.TensorProto.INT64, [1], [0])

#: The model dtype T of docs/ops.md. (onnxscript reads typing.Union / typing.Tuple annotations.)
T = TypeVar("T", bound=Union[FLOAT, FLOAT16, BFLOAT16])  # noqa: UP007


@onnxscript.script(mtx_opset, default_opset=op)
def SlidingWindowGQA(query: T, key: T, value: T, past_key: T, past_value: T, start_pos: INT64, inv_freq: FLOAT,
                     num_heads: int, num_kv_heads: int, window: int, scale: float,
                     plugin_version: str = "1", plugin_namespace: str = "mtx") -> Tuple[T, T, T]:  # noqa: UP006
    """docs/ops.md §2: query [B,S,Hq*D], key/value [B,S,Hkv*D], buffers [B,Hkv,C,D], start_pos [B].

    (``Cast(to=1)`` is a cast to float32.)
    """
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    seq = op.Shape(query, start=1, end=2)  # [1] = S
    cap = op.Shape(past_key, start=2, end=3)  # [1] = C
    head = op.Shape(past_key, start=3, end=4)  # [1] = D
    heads_shape = op.Concat(op.Constant(value_ints=[0, 0, -1]), head, axis=0)

    # Positions of the chunk [B, S] and RoPE tables [B, S, 1, D/2] in float32.
    pos = op.Add(op.Unsqueeze(start_pos, [1]), op.Unsqueeze(op.Range(zero, op.Squeeze(seq), one), [0]))
    angle = op.Mul(op.Unsqueeze(op.Cast(pos, to=1), [2]), inv_freq)
    cos = op.Unsqueeze(op.Cos(angle), [2])
    sin = op.Unsqueeze(op.Sin(angle), [2])

    # Rotate q and k (half-split) in float32, round to T.
    qf = op.Cast(op.Reshape(query, heads_shape), to=1)
    q1, q2 = op.Split(qf, axis=3, num_outputs=2)
    q_rot = op.CastLike(op.Concat(op.Sub(op.Mul(q1, cos), op.Mul(q2, sin)),
                                  op.Add(op.Mul(q2, cos), op.Mul(q1, sin)), axis=3), query)
    kf = op.Cast(op.Reshape(key, heads_shape), to=1)
    k1, k2 = op.Split(kf, axis=3, num_outputs=2)
    k_rot = op.CastLike(op.Concat(op.Sub(op.Mul(k1, cos), op.Mul(k2, sin)),
                                  op.Add(op.Mul(k2, cos), op.Mul(k1, sin)), axis=3), key)
    k_new = op.Transpose(k_rot, perm=[0, 2, 1, 3])  # [B, Hkv, S, D] in T
    v_new = op.Transpose(op.Reshape(value, heads_shape), perm=[0, 2, 1, 3])

    # Keys/values seen by the chunk: the buffer as held before the call, then the chunk (float32).
    keys = op.Concat(op.Cast(past_key, to=1), op.Cast(k_new, to=1), axis=2)  # [B, Hkv, C+S, D]
    vals = op.Concat(op.Cast(past_value, to=1), op.Cast(v_new, to=1), axis=2)

    # Absolute position held by each slot before the call (-1: empty), then the chunk's positions.
    last = op.Unsqueeze(op.Sub(start_pos, one), [1])  # [B, 1]
    slots = op.Range(zero, op.Squeeze(cap), one)  # [C]
    held = op.Sub(last, op.Mod(op.Sub(last, slots), cap))
    held = op.Where(op.GreaterOrEqual(held, zero), held, op.Constant(value_int=-1))
    key_pos = op.Concat(held, pos, axis=1)  # [B, C+S]

    # Visibility: k >= 0 and p - W < k <= p, with W = window or C.
    win = op.Where(op.Greater(window, zero), window, cap)
    p = op.Unsqueeze(pos, [2])  # [B, S, 1]
    k = op.Unsqueeze(key_pos, [1])  # [B, 1, C+S]
    seen = op.And(op.And(op.GreaterOrEqual(k, zero), op.LessOrEqual(k, p)), op.Less(op.Sub(p, k), win))
    seen = op.Unsqueeze(seen, [1, 2])  # [B, 1, 1, S, C+S]

    # Grouped scores [B, Hkv, G, S, C+S]: query head h uses KV head h div G.
    kv_heads = op.Shape(past_key, start=1, end=2)
    group_shape = op.Concat(op.Constant(value_ints=[0, 0]), kv_heads, op.Constant(value_ints=[-1]), head, axis=0)
    qg = op.Transpose(op.Reshape(op.Cast(q_rot, to=1), group_shape), perm=[0, 2, 3, 1, 4])
    scores = op.Mul(op.MatMul(qg, op.Unsqueeze(op.Transpose(keys, perm=[0, 1, 3, 2]), [2])), scale)
    scores = op.Where(seen, scores, op.Constant(value_float=float("-inf")))
    probs = op.Softmax(scores, axis=-1)
    out = op.MatMul(probs, op.Unsqueeze(vals, [2]))  # [B, Hkv, G, S, D]
    out = op.Reshape(op.Transpose(out, perm=[0, 3, 1, 2, 4]), op.Constant(value_ints=[0, 0, -1]))
    output = op.CastLike(out, query)

    # Write the last min(S, C) chunk tokens to slots (start + i) mod C, after all reads.
    neg_cap = op.Neg(cap)
    big = op.Constant(value_ints=[9223372036854775807])
    kept_k = op.Slice(k_new, neg_cap, big, [2])
    kept_v = op.Slice(v_new, neg_cap, big, [2])
    slot = op.Slice(op.Mod(pos, cap), neg_cap, big, [1])  # [B, S']
    index = op.Expand(op.Unsqueeze(slot, [1, 3]), op.Shape(kept_k))
    present_key = op.ScatterElements(past_key, index, kept_k, axis=2)
    present_value = op.ScatterElements(past_value, index, kept_v, axis=2)
    return output, present_key, present_value


@onnxscript.script(mtx_opset, default_opset=op)
def MoE(input: T, router_weight: T, w1: T, w3: T, w2: T, top_k: int,
        plugin_version: str = "1", plugin_namespace: str = "mtx") -> T:
    """docs/ops.md §3: input [..., H]; router [E, H]; w1, w3 [E, I, H]; w2 [E, H, I]."""
    hidden = op.Shape(input, start=-1)
    x = op.Reshape(input, op.Concat(op.Constant(value_ints=[-1]), hidden, axis=0))  # [N, H]
    logits = op.MatMul(x, op.Transpose(router_weight, perm=[1, 0]))  # [N, E] in T
    probs = op.Softmax(op.Cast(logits, to=1), axis=-1)
    top_p, top_e = op.TopK(probs, op.Reshape(top_k, op.Constant(value_ints=[1])), axis=-1, largest=1, sorted=1)
    weights = op.CastLike(op.Div(top_p, op.ReduceSum(top_p, op.Constant(value_ints=[-1]), keepdims=1)), input)
    dense = op.ScatterElements(op.CastLike(op.ConstantOfShape(op.Shape(probs)), input), top_e, weights, axis=1)
    picked = op.ScatterElements(op.ConstantOfShape(op.Shape(probs), value=_INT64_ZERO),
                                top_e, op.Expand(op.Constant(value_int=1), op.Shape(top_e)), axis=1)
    xe = op.Unsqueeze(x, [0])  # [1, N, H]
    gate = op.MatMul(xe, op.Transpose(w1, perm=[0, 2, 1]))  # [E, N, I]
    up = op.MatMul(xe, op.Transpose(w3, perm=[0, 2, 1]))
    y = op.MatMul(op.Mul(op.Mul(gate, op.Sigmoid(gate)), up), op.Transpose(w2, perm=[0, 2, 1]))  # [E, N, H]
    scaled = op.Mul(y, op.Unsqueeze(op.Transpose(dense, perm=[1, 0]), [2]))
    chosen = op.Unsqueeze(op.Transpose(op.Greater(picked, op.Constant(value_int=0)), perm=[1, 0]), [2])
    out = op.ReduceSum(op.Where(chosen, scaled, op.CastLike(op.Constant(value_float=0.0), input)),
                       op.Constant(value_ints=[0]), keepdims=0)
    return op.Reshape(out, op.Shape(input))


def _node_schema(function: onnxscript.OnnxFunction, doc: str) -> onnx.defs.OpSchema:
    """An OpSchema for nodes that call ``function`` (built from its signature; not registered globally).

    torch.onnx records a custom-domain node from a schema; the function itself is attached to the
    model after export (torch.onnx's version conversion would otherwise inline it).
    """
    proto = function.to_function_proto()
    hints = function.function.__annotations__
    kinds = {"start_pos": "tensor(int64)", "inv_freq": "tensor(float)"}
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    params = [onnx.defs.OpSchema.FormalParameter(n, "T" if n not in kinds else kinds[n]) for n in proto.input]
    outputs = [onnx.defs.OpSchema.FormalParameter(n, "T") for n in proto.output]
    attr_types = {"int": onnx.defs.OpSchema.AttrType.INT, "float": onnx.defs.OpSchema.AttrType.FLOAT,
                  "str": onnx.defs.OpSchema.AttrType.STRING}
    attributes = [onnx.defs.OpSchema.Attribute(a, attr_types[getattr(hints[a], "__name__", hints[a])], "",
                                               required=True) for a in proto.attribute]
    attributes += [onnx.defs.OpSchema.Attribute(a.name, a) for a in proto.attribute_proto]
    return onnx.defs.OpSchema(proto.name, DOMAIN, DOMAIN_VERSION, doc, inputs=params, outputs=outputs,
                              type_constraints=[("T", floats, "the model dtype")], attributes=attributes)


_attention_node = onnxscript.values.Op(mtx_opset, ATTENTION_OP, _node_schema(SlidingWindowGQA, "docs/ops.md §2"))
_moe_node = onnxscript.values.Op(mtx_opset, MOE_OP, _node_schema(MoE, "docs/ops.md §3"))


def translate_swa_gqa(query, key, value, past_key, past_value, start_pos, inv_freq,
                      num_heads: int, num_kv_heads: int, window: int, scale: float):
    """torch.onnx translation of ``torch.ops.mtx.swa_gqa``: one ``mtx::SlidingWindowGQA`` node."""
    return _attention_node(query, key, value, past_key, past_value, start_pos, inv_freq,
                           num_heads=num_heads, num_kv_heads=num_kv_heads, window=window, scale=float(scale),
                           plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)


def translate_moe(x, router_weight, w1, w3, w2, top_k: int):
    """torch.onnx translation of ``torch.ops.mtx.moe``: one ``mtx::MoE`` node."""
    return _moe_node(x, router_weight, w1, w3, w2, top_k=top_k,
                     plugin_version=PLUGIN_VERSION, plugin_namespace=PLUGIN_NAMESPACE)


def function_protos() -> list[onnx.FunctionProto]:
    """The model-local functions defining the two ops with standard ONNX ops."""
    return [SlidingWindowGQA.to_function_proto(), MoE.to_function_proto()]
