"""Graph fusions for the ``onnxruntime`` target: fewer, larger kernels per decode step.

Applied after :func:`mtx.exporter.ort_lowering.lower`; each rewrite keeps the arithmetic of the
reference (docs/ops.md §4 names them):

* RMSNorm of a residual sum — the traced ``Add(a, b)`` followed by the chain ``Pow(x, 2) →
  ReduceMean(-1) → Add(eps) → Sqrt → Reciprocal → Mul(x, ·) [→ Cast(T)] → Mul(weight, ·)`` becomes
  ``com.microsoft.SkipSimplifiedLayerNormalization(a, b, weight)`` (float32 statistics), whose sum
  output takes over the Add's value (same name, so per-layer taps keep working). The first norm (of
  the embedding) has no residual and stays as traced: ONNX Runtime's plain
  SimplifiedLayerNormalization sits in the default domain, which the ONNX checker rejects.
* QKV — the three projections feeding a ``GroupQueryAttention`` become one MatMul over the
  concatenated ``[Wq; Wk; Wv]`` (initializer ``layers.{l}.attn.wqkv.weight``), passed as the packed
  query input.
* Gate/up (quantised exports only, :func:`pack_gate_up`) — the two projections of a dense SwiGLU
  become one MatMul over ``[W1; W3]`` (initializer ``layers.{l}.ffn.w13.weight``) followed by a Split
  into gate and up. Float exports keep them apart, as traced (they once stayed referenced in the
  checkpoint's own file; since each weight is held once, docs/ops.md §6, the packed QKV already
  keeps that file out, so packing them too would now cost no disk).

A chain that does not match exactly is left as it is (still correct, only slower).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import torch

from mtx.exporter.ort_lowering import MS_DOMAIN, add_initializer
from mtx.exporter.weights import lazy


def _producer(v: ir.Value | None, op: str) -> ir.Node | None:
    n = v.producer() if v is not None else None
    return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None


def _sole_consumer(v: ir.Value, op: str) -> ir.Node | None:
    uses = list(v.uses())
    if len(uses) != 1 or v.is_graph_output():
        return None
    node = uses[0][0]
    return node if node.op_type == op and node.domain in ("", "ai.onnx") else None


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    if v.const_value is not None:
        return np.asarray(v.const_value.numpy())
    n = v.producer()
    if n is not None and n.op_type == "Constant":
        attr = next(iter(n.attributes.values()))
        val = attr.value
        return np.asarray(val.numpy() if hasattr(val, "numpy") else val)
    if n is not None and n.op_type == "Reshape":  # torch.onnx spells constant axes as Reshape(Constant, [-1])
        data, shape = (_const(i) for i in n.inputs[:2])
        if data is not None and shape is not None:
            return data.reshape(shape.astype(np.int64).tolist())
    return None


def _other(node: ir.Node, v: ir.Value) -> ir.Value | None:
    a, b = node.inputs
    return b if a is v else a if b is v else None


def _match_rms_norm(pow_node: ir.Node) -> tuple[ir.Value, ir.Value, float, list[ir.Node], ir.Value] | None:
    """(x in T, weight, eps, nodes to remove, output value) for one traced RMSNorm, or None."""
    xf, exponent = pow_node.inputs
    e = _const(exponent)
    if e is None or e.size != 1 or float(e.reshape(())) != 2.0:
        return None
    mean = _sole_consumer(pow_node.outputs[0], "ReduceMean")
    if mean is None or mean.attributes.get("keepdims", ir.AttrInt64("keepdims", 1)).value != 1:
        return None
    axes = _const(mean.inputs[1]) if len(mean.inputs) > 1 else None
    if axes is None or axes.reshape(-1).tolist() != [-1]:
        return None
    add = _sole_consumer(mean.outputs[0], "Add")
    eps = _const(_other(add, mean.outputs[0])) if add is not None else None
    if eps is None or eps.size != 1:
        return None
    sqrt = _sole_consumer(add.outputs[0], "Sqrt")
    recip = _sole_consumer(sqrt.outputs[0], "Reciprocal") if sqrt is not None else None
    mul = _sole_consumer(recip.outputs[0], "Mul") if recip is not None else None
    if mul is None or _other(mul, recip.outputs[0]) is not xf:
        return None
    chain = [pow_node, mean, add, sqrt, recip, mul]
    # mean(x^2) in float32: x itself, or Cast(x -> float) of x in T (then the product is cast back).
    cast_in = _producer(xf, "Cast")
    x = cast_in.inputs[0] if cast_in is not None else xf
    last = mul.outputs[0]
    cast_out = _sole_consumer(last, "Cast")
    if cast_in is not None:
        if cast_out is None:
            return None
        chain.append(cast_out)
        last = cast_out.outputs[0]
    scale = _sole_consumer(last, "Mul")
    if scale is None:
        return None
    weight = _other(scale, last)
    if weight is None or not weight.is_initializer() or len(weight.shape) != 1:
        return None
    chain.append(scale)
    if cast_in is not None and len(list(xf.uses())) == 2:  # Pow and Mul only: the Cast goes too
        chain.insert(0, cast_in)
    return x, weight, float(eps.reshape(())), chain, scale.outputs[0]


def fuse_rms_norms(model: ir.Model) -> int:
    """Fuse each residual Add + RMSNorm into SkipSimplifiedLayerNormalization; returns how many."""
    graph = model.graph
    fused = 0
    for node in [n for n in graph if n.op_type == "Pow" and n.domain in ("", "ai.onnx")]:
        if node.graph is None:  # removed as part of an earlier chain
            continue
        m = _match_rms_norm(node)
        if m is None:
            continue
        x, weight, eps, chain, out = m
        residual = _producer(x, "Add")
        if residual is None or any(i.is_graph_input() or i.is_initializer() for i in residual.inputs) \
                or residual.inputs[0].shape != residual.inputs[1].shape:
            continue  # a norm without a residual Add (the first one) stays as traced
        a, b = residual.inputs
        tape = ir.tape.Tape()
        y, _, _, total = tape.op_multi_out("SkipSimplifiedLayerNormalization", [a, b, weight], {"epsilon": eps},
                                           num_outputs=4, domain=MS_DOMAIN)
        ir.convenience.replace_nodes_and_values(graph, chain[0], chain, tape.nodes, [out], [y])
        name = x.name
        total.shape, total.type, y.shape, y.type = x.shape, x.type, out.shape, out.type
        x.replace_all_uses_with(total, replace_graph_outputs=True)
        graph.remove(residual, safe=True)
        total.name = name
        fused += 1
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    return fused


def _projection(v: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(x, W) for v = MatMul(x, Transpose(W)) with W an initializer [out, in], used by one node
    besides Shape nodes (which read only batch and sequence length)."""
    mm = _producer(v, "MatMul")
    if mm is None or sum(1 for n, _ in v.uses() if n.op_type != "Shape") != 1:
        return None
    t = _producer(mm.inputs[1], "Transpose")
    if t is None or not t.inputs[0].is_initializer() or list(t.attributes["perm"].value) != [1, 0]:
        return None
    return mm.inputs[0], t.inputs[0]


def pack_qkv(model: ir.Model, dtype: torch.dtype, load: Callable[[str], torch.Tensor]) -> int:
    """One MatMul over [Wq; Wk; Wv] per GroupQueryAttention (packed-QKV input); returns how many."""
    graph = model.graph
    packed = 0
    for node in [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]:
        projections = [_projection(v) for v in node.inputs[:3]]
        if any(p is None for p in projections) or len({id(p[0]) for p in projections}) != 1:
            continue
        x = projections[0][0]
        names = [p[1].name for p in projections]
        rows = sum(int(p[1].shape[0]) for p in projections)
        cols = int(projections[0][1].shape[1])
        name = names[0].replace(".wq.", ".wqkv.")
        tensor = lazy(name, (rows, cols), dtype, lambda names=names: torch.cat([load(n) for n in names], dim=0))
        w = add_initializer(graph, name, tensor)
        old = [v.producer() for v in node.inputs[:3]]
        transposes = [n.inputs[1].producer() for n in old]
        tape = ir.tape.Tape()
        qkv = tape.op("MatMul", [x, tape.op("Transpose", [w], {"perm": [1, 0]})])
        graph.insert_before(old[0], tape.nodes)  # where q was computed: before any reader of it
        for v in node.inputs[:3]:  # Shape(q)[1:2] etc. read batch/sequence, which the packed tensor shares
            for user, index in list(v.uses()):
                if user.op_type == "Shape":
                    user.replace_input_with(index, qkv)
        node.replace_input_with(0, qkv)
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        for n in old + transposes:
            if not any(True for out in n.outputs for _ in out.uses()):
                graph.remove(n, safe=True)
        packed += 1
    return packed  # the separate q/k/v weights, now unused, go with fuse()'s RemoveUnusedNodesPass


def _weight_projection(w_name: str, graph: ir.Graph) -> tuple[ir.Node, ir.Node] | None:
    """(Transpose, MatMul) of ``MatMul(x, Transpose(W))`` for initializer ``w_name``, or None."""
    w = graph.initializers.get(w_name)
    if w is None:
        return None
    uses = [n for n, _ in w.uses()]
    if len(uses) != 1 or uses[0].op_type != "Transpose" or list(uses[0].attributes["perm"].value) != [1, 0]:
        return None
    mm = [(n, i) for n, i in uses[0].outputs[0].uses()]
    if len(mm) != 1 or mm[0][0].op_type != "MatMul" or mm[0][1] != 1:
        return None
    return uses[0], mm[0][0]


def pack_gate_up(model: ir.Model, dtype: torch.dtype, load: Callable[[str], torch.Tensor]) -> int:
    """One MatMul over [W1; W3] per dense SwiGLU, split into gate and up; returns how many."""
    graph = model.graph
    packed = 0
    for name in [n for n in graph.initializers if n.endswith(".ffn.w1.weight")]:
        gate, up = _weight_projection(name, graph), _weight_projection(name.replace(".w1.", ".w3."), graph)
        if gate is None or up is None or gate[1].inputs[0] is not up[1].inputs[0]:
            continue
        x = gate[1].inputs[0]
        w1, w3 = graph.initializers[name], graph.initializers[name.replace(".w1.", ".w3.")]
        rows, cols = int(w1.shape[0]), int(w1.shape[1])
        packed_name = name.replace(".w1.", ".w13.")
        names = [w1.name, w3.name]
        w = add_initializer(graph, packed_name, lazy(packed_name, (2 * rows, cols), dtype,
                                                     lambda names=names: torch.cat([load(n) for n in names], dim=0)))
        tape = ir.tape.Tape()
        both = tape.op("MatMul", [x, tape.op("Transpose", [w], {"perm": [1, 0]})])
        sizes = tape.op("Constant", [], {"value_ints": [rows, rows]})
        g, u = tape.op_multi_out("Split", [both, sizes], {"axis": -1}, num_outputs=2)
        first = next(n for n in graph if n is gate[1] or n is up[1])
        graph.insert_before(first, tape.nodes)
        for new, (_, mm) in ((g, gate), (u, up)):
            old = mm.outputs[0]
            new.shape, new.type = old.shape, old.type
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        for node in (gate[1], gate[0], up[1], up[0]):
            graph.remove(node, safe=True)
        packed += 1
    return packed


def fuse(model: ir.Model, dtype: torch.dtype, load: Callable[[str], torch.Tensor]) -> dict[str, int]:
    """All fusions of this module, then dead-node removal; returns counts by fusion."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    counts = {"qkv_packed": pack_qkv(model, dtype, load), "skip_rms_norms": fuse_rms_norms(model)}
    RemoveUnusedNodesPass()(model)
    return counts
