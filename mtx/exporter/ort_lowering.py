"""Lower the mtx nodes to ONNX Runtime contrib ops, after checking what the installed ORT does.

``mtx::SlidingWindowGQA`` becomes ``com.microsoft.GroupQueryAttention`` (rotary from cos/sin
tables of ``max_position`` rows, windowed KV cache) and ``mtx::MoE`` becomes ``com.microsoft.MoE``
(interleaved SwiGLU). What ORT does is established empirically, not assumed: :func:`plan` lowers
one-node graphs with the model's head shape and dtype, runs them on ORT's CPU provider and compares
them with the PyTorch reference ops (:mod:`mtx.models.ops`). A block ORT cannot run exactly stays an
mtx node with its function body, and the reason is reported.

Findings this module encodes (checked again by every :func:`plan`):

* ``local_window_size`` counts the query itself from ORT 1.24 on (``W``), before it did not
  (``W - 1``); :func:`window_offset` finds which by running past the window.
* With ``sliding_window_cache = 1`` the buffers hold ORT's own layout (rows ``[0, L)`` hold the most
  recent positions in order), not slot ``p mod C``; a call with ``seq > 1`` after the first needs
  ``batch == 1``.
* ORT's MoE applies softmax to ``router_probs`` itself (it takes logits) and breaks top-k ties towards
  the higher expert index. To keep the spec's routing (float32 softmax, ties to the lower index) the
  lowering computes the routing itself and hands ORT ``log(w)`` for the chosen experts and ``-inf``
  for the others: ORT's softmax, top-k and renormalisation then reproduce exactly those weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype

from mtx.exporter import functions
from mtx.exporter.weights import lazy
from mtx.models import ops

MS_DOMAIN = "com.microsoft"
PROVIDER = "CPUExecutionProvider"
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
        if node.domain != functions.DOMAIN:
            continue
        if node.op_type == functions.ATTENTION_OP and attention:
            _lower_attention(graph, node, shared, rope, dtype, window_offset, max_position)
        elif node.op_type == functions.MOE_OP and moe:
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


# --------------------------------------------------------------------------------------------------
# Probes: one-node graphs lowered as above, run on ORT's CPU provider, compared with the reference.


@dataclass(frozen=True)
class Capability:
    """Whether a lowering is exact on the installed ORT, and why not."""

    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class OrtPlan:
    """What :func:`plan` decided for one model and dtype."""

    window_offset: int | None  # local_window_size = W - window_offset; None: no convention matched
    attention: Capability
    moe: Capability | None  # None for dense models

    def local_window_size(self, window: int) -> int | None:
        return None if not window or self.window_offset is None else window - self.window_offset


def _session(model: ir.Model):
    import onnxruntime as ort

    model.ir_version = IR_VERSION
    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # ORT logs kernel failures itself; the caller reports them
    return ort.InferenceSession(proto.SerializeToString(), options, providers=[PROVIDER])


def single_op_model(op: str, inputs: dict[str, torch.Tensor], consts: dict[str, torch.Tensor], attrs: dict,
                    num_outputs: int) -> ir.Model:
    """A model with one ``mtx::op`` node: graph inputs ``inputs`` (all dims dynamic; the tensors give
    dtype and rank), initializers ``consts``, outputs ``out0 …``. Attach the function body with
    :func:`mtx.exporter.trace.attach_functions` or lower it with :func:`lower`.
    """
    graph_inputs = [ir.Value(name=n, shape=ir.Shape([None] * t.dim()), type=ir.TensorType(from_torch_dtype(t.dtype)))
                    for n, t in inputs.items()]  # dynamic dims: the probes feed chunks of any length
    init = [ir.Value(name=n, shape=ir.Shape(t.shape), type=ir.TensorType(from_torch_dtype(t.dtype)),
                     const_value=TorchTensor(t, name=n)) for n, t in consts.items()]
    by_name = {v.name: v for v in graph_inputs + init}
    order = list(inputs) + list(consts)
    node = ir.Node(functions.DOMAIN, op, [by_name[n] for n in order], ir.convenience.convert_attributes(attrs),
                   num_outputs=num_outputs)
    graph = ir.Graph(graph_inputs, node.outputs, nodes=[node], initializers=init,
                     opset_imports={"": functions.OPSET, functions.DOMAIN: functions.DOMAIN_VERSION})
    for i, out in enumerate(node.outputs):
        out.name = f"out{i}"
    return ir.Model(graph, ir_version=IR_VERSION)


def _run_attention(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, window: int, capacity: int,
                   chunks: list[int], offset: int, seed: int = 0) -> float:
    """Max |ORT lowered - reference| over a sequence fed in ``chunks`` (batch 1, present fed back as past)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(chunks)
    q = torch.randn(1, total, heads * head_dim, generator=g) * 2
    k = torch.randn(1, total, kv_heads * head_dim, generator=g) * 2
    v = torch.randn(1, total, kv_heads * head_dim, generator=g)
    inv = ops.rope_inv_freq(head_dim, 10000.0)
    buf = torch.zeros(1, kv_heads, capacity, head_dim)
    args = dict(query=q[:, :1], key=k[:, :1], value=v[:, :1], past_key=buf, past_value=buf,
                start_pos=torch.zeros(1, dtype=torch.long))
    attrs = dict(num_heads=heads, num_kv_heads=kv_heads, window=window, scale=head_dim ** -0.5,
                 plugin_version=functions.PLUGIN_VERSION, plugin_namespace=functions.PLUGIN_NAMESPACE)
    model = single_op_model(functions.ATTENTION_OP, {n: t.to(dtype) if t.is_floating_point() else t
                                                      for n, t in args.items()}, {"inv_freq": inv}, attrs, 3)
    lower(model, dtype=dtype, window_offset=offset, max_position=total + 1, attention=True, moe=False, load=None)
    session = _session(model)
    pk_ref, pv_ref = buf.clone(), buf.clone()
    pk, pv = buf.to(dtype), buf.to(dtype)
    err, start = 0.0, 0
    for n in chunks:
        sl = slice(start, start + n)
        sp = torch.tensor([start])
        ref, pk_ref, pv_ref = ops.swa_gqa(q[:, sl], k[:, sl], v[:, sl], pk_ref, pv_ref, sp, inv, heads, kv_heads,
                                          window, head_dim ** -0.5)
        feeds = {"query": q[:, sl], "key": k[:, sl], "value": v[:, sl], "past_key": pk, "past_value": pv,
                 "start_pos": sp}
        out, pk_np, pv_np = session.run(None, {n_: _np(t.to(dtype) if t.is_floating_point() else t)
                                                for n_, t in feeds.items()})
        pk, pv = _torch(pk_np), _torch(pv_np)
        err = max(err, (_torch(out).float() - ref).abs().max().item())
        start += n
    return err


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 2e-1}[dtype]


@functools.lru_cache(maxsize=None)
def window_offset() -> int | None:
    """0 if the installed ORT's ``local_window_size`` counts the query itself (W), 1 if not (W-1).

    Found by running a windowed GroupQueryAttention past its window (a 7-token prompt, then single
    tokens; window 4, capacity 6) against the reference op. None if neither setting matches.
    """
    for offset in (0, 1):
        try:
            err = _run_attention(torch.float32, 2, 1, 16, window=4, capacity=6, chunks=[7, 2, 1, 1, 1, 1, 1],
                                 offset=offset)
        except Exception:  # noqa: BLE001 - any ORT failure means "this convention does not work"
            continue
        if err <= 1e-4:
            return offset
    return None


@functools.lru_cache(maxsize=None)
def attention_capability(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, windowed: bool) -> Capability:
    """Can ORT's CPU GroupQueryAttention run this head shape and dtype exactly (up to dtype rounding)?"""
    offset = window_offset()
    if offset is None:
        return Capability(False, "GroupQueryAttention's local_window_size matches neither W nor W-1 "
                                 "on this onnxruntime")
    if head_dim % 16:
        return Capability(False, f"GroupQueryAttention's rotary embedding needs a head size that is a multiple "
                                 f"of 16, got {head_dim}")
    window, capacity = (3, 5) if windowed else (0, 8)
    try:
        err = _run_attention(dtype, heads, kv_heads, head_dim, window=window, capacity=capacity, chunks=[5, 1, 1],
                             offset=offset)
    except Exception as e:  # noqa: BLE001
        return Capability(False, f"GroupQueryAttention fails on onnxruntime's CPU provider for "
                                 f"{_dtype_name(dtype)}: {_first_line(e)}")
    if not err <= _tolerance(dtype):
        return Capability(False, f"GroupQueryAttention differs from the reference by {err:.2e} "
                                 f"for {_dtype_name(dtype)}")
    return Capability(True)


@functools.lru_cache(maxsize=None)
def moe_capability(dtype: torch.dtype, experts: int, top_k: int) -> Capability:
    """Can ORT's CPU MoE reproduce docs/ops.md §3 for this dtype (including exact router ties)?"""
    g = torch.Generator().manual_seed(0)
    n, h, i = 6, 16, 24
    x = torch.randn(n, h, generator=g)
    x[0] = 0  # all router logits 0: an exact tie between every expert
    router = torch.randn(experts, h, generator=g)
    w1 = torch.randn(experts, i, h, generator=g) * 0.3
    w3 = torch.randn(experts, i, h, generator=g) * 0.3
    w2 = torch.randn(experts, h, i, generator=g) * 0.3
    ref = ops.moe_reference(x, router, w1, w3, w2, top_k)
    weights = {"router_weight": router, "w1": w1, "w3": w3, "w2": w2}
    model = single_op_model(functions.MOE_OP, {"input": x.to(dtype)}, {k: t.to(dtype) for k, t in weights.items()},
                            dict(top_k=top_k, plugin_version=functions.PLUGIN_VERSION,
                                 plugin_namespace=functions.PLUGIN_NAMESPACE), 1)
    try:
        lower(model, dtype=dtype, window_offset=0, max_position=1, attention=False, moe=True,
              load=lambda name: weights[name].to(dtype))
        (out,) = _session(model).run(None, {"input": _np(x.to(dtype))})
    except Exception as e:  # noqa: BLE001
        return Capability(False, f"MoE fails on onnxruntime's CPU provider for {_dtype_name(dtype)}: {_first_line(e)}")
    err = (_torch(out).float() - ref).abs().max().item()
    if not err <= _tolerance(dtype):
        return Capability(False, f"MoE differs from the reference by {err:.2e} for {_dtype_name(dtype)}")
    return Capability(True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[-1] if text else type(e).__name__
    return line.split("Status Message: ")[-1].strip()


def plan(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, windowed: bool,
         experts: int = 0, top_k: int = 0) -> OrtPlan:
    """Decide which blocks to lower for this model and dtype on the installed ONNX Runtime."""
    return OrtPlan(
        window_offset=window_offset(),
        attention=attention_capability(dtype, heads, kv_heads, head_dim, windowed),
        moe=moe_capability(dtype, experts, top_k) if experts else None,
    )
