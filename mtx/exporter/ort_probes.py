"""Probe the installed ONNX Runtime at export time: which lowerings of :mod:`mtx.exporter.ort_lowering` are exact.

What ORT does is established empirically, not assumed: :func:`plan` lowers one-node graphs with the
model's head shape and dtype, runs them on ORT's CPU provider and compares them with the PyTorch
reference ops (:mod:`mtx.models.ops`). A block ORT cannot run exactly stays an mtx node with its
function body, and the reason is reported.

* ``local_window_size`` counts the query itself from ORT 1.24 on (``W``), before it did not
  (``W - 1``); :func:`window_offset` finds which by running past the window.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype

from mtx import names
from mtx.exporter.ort_lowering import IR_VERSION, lower
from mtx.models import ops

PROVIDER = "CPUExecutionProvider"


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
    node = ir.Node(names.DOMAIN, op, [by_name[n] for n in order], ir.convenience.convert_attributes(attrs),
                   num_outputs=num_outputs)
    graph = ir.Graph(graph_inputs, node.outputs, nodes=[node], initializers=init,
                     opset_imports={"": names.OPSET, names.DOMAIN: names.DOMAIN_VERSION})
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
                 plugin_version=names.PLUGIN_VERSION, plugin_namespace=names.PLUGIN_NAMESPACE)
    model = single_op_model(names.ATTENTION_OP, {n: t.to(dtype) if t.is_floating_point() else t
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
    model = single_op_model(names.MOE_OP, {"input": x.to(dtype)}, {k: t.to(dtype) for k, t in weights.items()},
                            dict(top_k=top_k, plugin_version=names.PLUGIN_VERSION,
                                 plugin_namespace=names.PLUGIN_NAMESPACE), 1)
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


def plan(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, windowed: bool | tuple[bool, ...],
         experts: int = 0, top_k: int = 0) -> OrtPlan:
    """Decide which blocks to lower for this model and dtype on the installed ONNX Runtime.

    ``windowed``: whether the layers are windowed, or one flag per layer (per-layer windows): attention is
    lowered only if every kind of layer present passes its check (the first failure is the reason)."""
    kinds = sorted(set(windowed), reverse=True) if isinstance(windowed, tuple) else [windowed]
    caps = [attention_capability(dtype, heads, kv_heads, head_dim, kind) for kind in kinds]
    return OrtPlan(
        window_offset=window_offset(),
        attention=next((c for c in caps if not c.ok), caps[0]),
        moe=moe_capability(dtype, experts, top_k) if experts else None,
    )
