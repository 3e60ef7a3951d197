"""Quantised weights in the graph (docs/ops.md §7): the rewrite behind ``mtx export --quantize``.

Applied after lowering and fusion (onnxruntime target) or right after tracing (onnx, tensorrt):

* a projection ``MatMul(x, Transpose(W))`` whose ``W`` is quantised becomes
  ``com.microsoft.MatMulNBits`` (onnxruntime) or keeps its MatMul with ``W`` replaced by a blocked
  ``DequantizeLinear`` of int codes (onnx, tensorrt);
* ``com.microsoft.MoE`` becomes ``com.microsoft.QMoE`` (int4, or int8 with ``accuracy_level`` 4;
  int8 with level 0 gets the dequantised float experts), and the ``w1``, ``w3``, ``w2`` inputs of a
  ``mtx::MoE`` node become DequantizeLinear outputs;
* the embedding ``Gather(embed.weight, input_ids)`` becomes ``com.microsoft.GatherBlockQuantized``
  (onnxruntime) or gathers from a DequantizeLinear of the table (onnx, tensorrt); a tied lm_head
  reads the same codes (a MatMulNBits over a Reshape of them, or the same DequantizeLinear output).

Every quantised initializer is lazy: one weight is loaded and quantised (:mod:`mtx.quantize`) when
its codes are written, kept for its scales and zero points (written right after), then dropped, so
peak memory stays about one float weight plus its codes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from mtx import names
from mtx import quantize as q
from mtx.errors import UsageError
from mtx.exporter.ort_lowering import MS_DOMAIN, add_initializer
from mtx.exporter.weights import lazy
from mtx.manifest import Fallback, Quantization, QuantizedTensor

#: Default-domain opset of a graph holding blocked DequantizeLinear (``block_size`` is opset 21).
DQ_OPSET = 21
DENSE = re.compile(r"layers\.\d+\.(attn\.(wq|wk|wv|wo|wqkv)|ffn\.(w1|w2|w3|w13))\.weight")
LM_HEAD = "output.weight"
EMBED = "embed.weight"
GATHER_OP = f"{MS_DOMAIN}::GatherBlockQuantized"


@dataclass
class QuantPlan:
    """What :func:`quantize_graph` did: manifest entries, fallbacks, whether DequantizeLinear was used."""

    tensors: list[QuantizedTensor] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    uses_dq: bool = False
    lm_head: bool = False  # the output projection (or a tied table) was quantised


class _Memo:
    """The last weight quantised: its codes, scales and zero points are written one after the other."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: q.Quantized | None = None

    def get(self, key: tuple, make: Callable[[], q.Quantized]) -> q.Quantized:
        if key != self.key:
            self.key, self.value = None, None  # free the previous weight before making the next
            self.value = make()
            self.key = key
        return self.value


def _sources(name: str) -> list[str]:
    """Canonical checkpoint tensors a graph weight is made of."""
    if name.endswith(".attn.wqkv.weight"):
        return [name.replace(".wqkv.", f".{w}.") for w in ("wq", "wk", "wv")]
    if name.endswith(".ffn.w13.weight"):
        return [name.replace(".w13.", f".{w}.") for w in ("w1", "w3")]
    if name.endswith(".moe.fc1_swiglu_interleaved"):
        base = name.removesuffix(".fc1_swiglu_interleaved")
        return [f"{base}.w1", f"{base}.w3"]
    return [name]


def _lazy_numpy(name: str, shape: tuple[int, ...], dtype: ir.DataType, make: Callable[[], np.ndarray]) -> ir.LazyTensor:
    def evaluate() -> ir.TensorProtocol:
        a = make()
        if tuple(a.shape) != tuple(shape):
            raise AssertionError(f"{name}: produced {list(a.shape)}, expected {list(shape)}")
        return ir.Tensor(a, dtype=dtype, name=name)
    return ir.LazyTensor(evaluate, dtype=dtype, shape=ir.Shape(shape), name=name)


def _constant(tape: ir.tape.Tape, a: np.ndarray) -> ir.Value:
    """A Constant node's value: small shape operands stay in model.onnx (ONNX Runtime's shape inference
    reads Reshape shapes and Slice bounds at load, and cannot read them from external data)."""
    out = tape.op("Constant", [], {"value": ir.tensor(a)})
    out.shape, out.type = ir.Shape(a.shape), ir.TensorType(ir.DataType.INT64)
    return out


class _Rewriter:
    def __init__(self, model: ir.Model, target: str, dtype: torch.dtype, spec: q.QuantSpec, accuracy_level: int,
                 lm_head: bool, load: Callable[[str], torch.Tensor], checkpoint_names: set[str],
                 lm_head_bits: int = q.LM_HEAD_BITS, embedding_bits: int | None = q.EMBEDDING_BITS) -> None:
        self.checkpoint_names, self.lm_head_bits, self.embedding_bits = checkpoint_names, lm_head_bits, embedding_bits
        self.model, self.graph, self.target, self.dtype = model, model.graph, target, dtype
        self.spec, self.accuracy_level, self.lm_head, self.load = spec, accuracy_level, lm_head, load
        self.memo = _Memo()
        self.plan = QuantPlan()

    # -- weights ------------------------------------------------------------------------------------

    def _float(self, value: ir.Value) -> torch.Tensor:
        """The float weight of an initializer: a checkpoint tensor, or the lazy one lowering made."""
        if value.name in self.checkpoint_names:
            return self.load(value.name)
        return torch.from_numpy(np.asarray(value.const_value.numpy()).copy()).to(self.dtype)

    def quantized(self, value: ir.Value, spec: q.QuantSpec) -> Callable[[], q.Quantized]:
        key = (value.name, spec)
        return lambda: self.memo.get(key, lambda: q.quantize(self._float(value), spec, self.dtype))

    def _register(self, value: ir.Value, spec: q.QuantSpec, op: str, form: str) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        """Initializers (codes, scales, zero points or None) of ``value`` in ``form``: nbits | qmoe | gather | dq.

        ``gather`` (GatherBlockQuantized): codes uint8 [N, kb·bs·bits/8], the bytes of MatMulNBits'
        [N, kb, bs·bits/8]; scales and zero points as MatMulNBits'.
        """
        shape = tuple(int(d) for d in value.shape)
        *lead, n, k = shape
        kb = -(-k // spec.block_size)
        get = self.quantized(value, spec)
        base = value.name
        if form == "dq":
            code_type = ir.DataType.UINT4 if spec.bits == 4 else ir.DataType.UINT8
            codes = _lazy_numpy(f"{base}.qcodes", shape, code_type, lambda: q.dq_codes(get()))
            zeros = _lazy_numpy(f"{base}.qzeros", (*lead, n, kb), code_type, lambda: q.dq_zero_points(get()))
        else:
            blob = spec.block_size * spec.bits // 8
            cshape = {"nbits": (n, kb, blob), "gather": (n, kb * blob)}.get(form, (*lead, n, kb * blob))
            codes = lazy(f"{base}.qcodes", cshape, torch.uint8,
                         lambda: q.matmul_nbits_weight(get()).reshape(cshape))
            zshape = (*lead, n, -(-kb * spec.bits // 8))
            zeros = None if spec.scheme == "symmetric" else lazy(
                f"{base}.qzeros", zshape, torch.uint8, lambda: q.matmul_nbits_zero_points(get()))
        scales = lazy(f"{base}.qscales", (*lead, n, kb), self.dtype, lambda: get().scales)
        values = [add_initializer(self.graph, codes.name, codes), add_initializer(self.graph, scales.name, scales),
                  None if zeros is None else add_initializer(self.graph, zeros.name, zeros)]
        self.plan.tensors.append(QuantizedTensor(base, _sources(base), list(shape), spec.bits, op, values[0].name,
                                                 values[1].name, None if values[2] is None else values[2].name))
        return values[0], values[1], values[2]

    def _dequantized(self, value: ir.Value, spec: q.QuantSpec) -> ir.Value:
        """A DequantizeLinear node giving ŵ in T for initializer ``value``."""
        codes, scales, zeros = self._register(value, spec, "ai.onnx::DequantizeLinear", "dq")
        tape = ir.tape.Tape()
        out = tape.op("DequantizeLinear", [codes, scales, zeros], {"axis": -1, "block_size": spec.block_size})
        out.shape, out.type = value.shape, value.type
        out.name = f"{value.name}.dequantized"
        self.graph.insert_before(self._first_user(value), tape.nodes)
        self.plan.uses_dq = True
        return out

    def _first_user(self, value: ir.Value) -> ir.Node:
        users = {id(n) for n, _ in value.uses()}
        return next(n for n in self.graph if id(n) in users)

    # -- rewrites -----------------------------------------------------------------------------------

    def projections(self) -> None:
        for node in [n for n in self.graph if n.op_type == "Transpose" and n.domain in ("", "ai.onnx")]:
            w = node.inputs[0]
            if w is None or not w.is_initializer() or list(node.attributes["perm"].value) != [1, 0]:
                continue
            if DENSE.fullmatch(w.name):
                spec = self.spec
            elif w.name == LM_HEAD and self.lm_head:
                spec = q.QuantSpec(self.lm_head_bits, self.spec.block_size, self.spec.scheme)
                self.plan.lm_head = True
            else:
                continue
            uses = list(node.outputs[0].uses())
            if self.target == "onnxruntime" and len(uses) == 1 and uses[0][0].op_type == "MatMul" and uses[0][1] == 1:
                self._matmul_nbits(uses[0][0], node, w, spec)
            else:
                node.replace_input_with(0, self._dequantized(w, spec))

    def _matmul_nbits(self, mm: ir.Node, transpose: ir.Node, w: ir.Value, spec: q.QuantSpec,
                      registered: tuple[ir.Value, ir.Value, ir.Value | None] | None = None) -> None:
        """``mm`` = MatMul(x, Transpose(w)) -> MatMulNBits; ``registered``: the gather-form initializers of a
        tied table, whose codes [N, kb·blob] the node reads through a Reshape to [N, kb, blob]."""
        n, k = (int(d) for d in w.shape)
        tape = ir.tape.Tape()
        if registered is None:
            codes, scales, zeros = self._register(w, spec, f"{MS_DOMAIN}::MatMulNBits", "nbits")
        else:
            flat, scales, zeros = registered
            kb, blob = -(-k // spec.block_size), spec.block_size * spec.bits // 8
            codes = tape.op("Reshape", [flat, _constant(tape, np.array([n, kb, blob], np.int64))])
            codes.name = f"{w.name}.qcodes.nbits"
            codes.shape, codes.type = ir.Shape([n, kb, blob]), ir.TensorType(ir.DataType.UINT8)
        inputs = [mm.inputs[0], codes, scales] + ([zeros] if zeros is not None else [])
        out = tape.op("MatMulNBits", inputs, {"K": k, "N": n, "bits": spec.bits, "block_size": spec.block_size,
                                              "accuracy_level": self.accuracy_level}, domain=MS_DOMAIN)
        old = mm.outputs[0]
        out.shape, out.type = old.shape, old.type
        ir.convenience.replace_nodes_and_values(self.graph, mm, [mm], tape.nodes, [old], [out])
        if not list(transpose.outputs[0].uses()):
            self.graph.remove(transpose, safe=True)

    def embedding(self) -> None:
        """The embedding table's gather (and a tied lm_head, which reads the same table) from codes.

        Untied: ``embedding_bits`` (None: the table stays in T). Tied: the lm_head's width, when both the
        embedding and the lm_head are quantised; else the table stays in T (docs/ops.md §7).
        """
        table = self.graph.initializers.get(EMBED)
        if table is None:
            return
        gathers, heads = [], []
        for node, index in table.uses():
            if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and index == 0 \
                    and node.attributes.get_int("axis", 0) == 0:
                gathers.append(node)
            elif node.op_type == "Transpose" and node.domain in ("", "ai.onnx") \
                    and list(node.attributes["perm"].value) == [1, 0]:
                heads.append(node)
            else:
                raise AssertionError(f"{EMBED} is read by a {node.op_type} node; expected Gather or the tied lm_head")
        if heads:
            if self.embedding_bits is None or not self.lm_head:
                return
            spec = q.QuantSpec(self.lm_head_bits, self.spec.block_size, self.spec.scheme)
            self.plan.lm_head = True
        elif self.embedding_bits is not None:
            spec = q.QuantSpec(self.embedding_bits, self.spec.block_size, self.spec.scheme)
        else:
            return
        if self.target != "onnxruntime":
            dq = self._dequantized(table, spec)
            for node in gathers + heads:
                node.replace_input_with(0, dq)
            return
        registered = self._register(table, spec, GATHER_OP, "gather")
        for node in gathers:
            self._gather_block_quantized(node, table, spec, registered)
        for transpose in heads:
            uses = list(transpose.outputs[0].uses())
            if len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 1:
                raise AssertionError(f"the tied lm_head's Transpose of {EMBED} does not feed one MatMul")
            self._matmul_nbits(uses[0][0], transpose, table, spec, registered)

    def _gather_block_quantized(self, gather: ir.Node, table: ir.Value, spec: q.QuantSpec,
                                registered: tuple[ir.Value, ir.Value, ir.Value | None]) -> None:
        """Gather(table, ids) -> GatherBlockQuantized(codes, ids, scales[, zero points]) [..., kb·bs],
        sliced to the first H elements when bs does not divide H."""
        codes, scales, zeros = registered
        h = int(table.shape[1])
        kb = -(-h // spec.block_size)
        tape = ir.tape.Tape()
        inputs = [codes, gather.inputs[1], scales] + ([zeros] if zeros is not None else [])
        out = tape.op("GatherBlockQuantized", inputs, {"gather_axis": 0, "quantize_axis": 1,
                                                       "block_size": spec.block_size, "bits": spec.bits},
                      domain=MS_DOMAIN)
        old = gather.outputs[0]
        if kb * spec.block_size != h:
            out.shape, out.type = ir.Shape([*old.shape[:-1], kb * spec.block_size]), old.type
            out.name = f"{table.name}.gathered_blocks"
            out = tape.op("Slice", [out, *(_constant(tape, np.array([v], np.int64)) for v in (0, h, -1))])
        out.shape, out.type = old.shape, old.type
        ir.convenience.replace_nodes_and_values(self.graph, gather, [gather], tape.nodes, [old], [out])

    def experts(self) -> None:
        for node in list(self.graph):
            if node.domain == names.DOMAIN and node.op_type == names.MOE_OP:
                for index in (2, 3, 4):  # w1, w3, w2
                    node.replace_input_with(index, self._dequantized(node.inputs[index], self.spec))
            elif node.domain == MS_DOMAIN and node.op_type == "MoE":
                self._qmoe(node)

    def _qmoe(self, node: ir.Node) -> None:
        x, route, fc1, _, fc2 = node.inputs[:5]
        e, two_i, h = (int(d) for d in fc1.shape)
        for what, size in (("hidden_size", h), ("intermediate_size", two_i // 2)):
            if size % self.spec.block_size:
                raise UsageError(f"block_size: {self.spec.block_size} does not divide the experts' {what} {size} "
                                 f"({fc1.name}); com.microsoft.QMoE has no short blocks (docs/ops.md §7): choose "
                                 f"a block size that divides {size}", params=("block_size",))
        if self.spec.bits == 8 and self.accuracy_level == 0:
            for index in (2, 4):  # fc1, fc2: int8 codes dequantised in the graph, float experts in MoE
                node.replace_input_with(index, self._dequantized(node.inputs[index], self.spec))
            if not self.plan.fallbacks:
                self.plan.fallbacks.append(Fallback(f"{MS_DOMAIN}::QMoE", [], (
                    "ONNX Runtime's CPU QMoE computes 8-bit experts with int8 activations only; with accuracy_level "
                    "0 the experts are dequantised (DequantizeLinear) and run by com.microsoft::MoE")))
            return
        op = f"{MS_DOMAIN}::QMoE"
        c1, s1, z1 = self._register(fc1, self.spec, op, "qmoe")
        c2, s2, z2 = self._register(fc2, self.spec, op, "qmoe")
        attrs = {a.name: a.value for a in node.attributes.values()}
        attrs.update(expert_weight_bits=self.spec.bits, block_size=self.spec.block_size,
                     accuracy_level=self.accuracy_level, weights_prepacked=0)
        inputs = [x, route, c1, s1, None, c2, s2, None, None, None, None]
        if z1 is not None:
            inputs += [z1, z2]
        tape = ir.tape.Tape()
        out = tape.op("QMoE", inputs, attrs, domain=MS_DOMAIN)
        old = node.outputs[0]
        out.shape, out.type = old.shape, old.type
        ir.convenience.replace_nodes_and_values(self.graph, node, [node], tape.nodes, [old], [out])


def quantize_graph(model: ir.Model, *, target: str, dtype: torch.dtype, spec: q.QuantSpec, accuracy_level: int,
                   lm_head: bool, load: Callable[[str], torch.Tensor], checkpoint_names: set[str],
                   lm_head_bits: int = q.LM_HEAD_BITS, embedding_bits: int | None = q.EMBEDDING_BITS) -> QuantPlan:
    """Rewrite ``model`` in place per docs/ops.md §7; returns the manifest's tensor list and fallbacks.

    ``load(name)`` gives a canonical checkpoint tensor in ``dtype`` (``checkpoint_names``); other
    initializers (packed QKV, interleaved experts) are evaluated from their lazy values.
    ``embedding_bits``: the embedding table's code width, None to keep it in T.
    """
    rw = _Rewriter(model, target, dtype, spec, accuracy_level, lm_head, load, checkpoint_names, lm_head_bits,
                   embedding_bits)
    rw.embedding()
    rw.projections()
    rw.experts()
    graph = model.graph
    for name in [n for n, v in graph.initializers.items() if not v.uses() and v not in graph.outputs]:
        graph.initializers.pop(name)
    return rw.plan


def set_dq_opset(model: ir.Model) -> None:
    """Default-domain opset 21 for the graph and its function bodies (blocked DequantizeLinear)."""
    model.opset_imports[""] = DQ_OPSET
    for fn in model.functions.values():
        fn.opset_imports[""] = DQ_OPSET


def manifest_entry(plan: QuantPlan, spec: q.QuantSpec, target: str, accuracy_level: int) -> Quantization:
    """The manifest's ``quantization`` (``lm_head``: whether the rewrite quantised the output projection)."""
    return Quantization("rtn", spec.bits, spec.block_size, spec.scheme,
                        accuracy_level if target == "onnxruntime" else None, plan.lm_head, plan.tensors)
