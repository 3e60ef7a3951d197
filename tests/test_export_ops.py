"""One-op graphs: the ONNX function bodies and the ONNX Runtime lowering against the reference ops.

Expected values come from mtx.models.ops (the oracle); the ONNX side runs in ONNX Runtime on CPU.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from packaging.version import Version

from mtx import names
from mtx.exporter import ort_lowering, ort_probes, trace
from mtx.exporter.ort_probes import single_op_model
from mtx.models import ops

ATOL = 1e-5


def session(model: ir.Model) -> ort.InferenceSession:
    model.ir_version = ort_lowering.IR_VERSION
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def attention_session(heads: int, kv_heads: int, head_dim: int, window: int, capacity: int, lower: bool = False):
    d = head_dim
    probe = dict(query=torch.zeros(1, 1, heads * d), key=torch.zeros(1, 1, kv_heads * d),
                 value=torch.zeros(1, 1, kv_heads * d), past_key=torch.zeros(1, kv_heads, capacity, d),
                 past_value=torch.zeros(1, kv_heads, capacity, d), start_pos=torch.zeros(1, dtype=torch.long))
    attrs = dict(num_heads=heads, num_kv_heads=kv_heads, window=window, scale=d ** -0.5,
                 plugin_version="1", plugin_namespace="mtx")
    model = single_op_model(names.ATTENTION_OP, probe, {"inv_freq": ops.rope_inv_freq(d, 10000.0)}, attrs, 3)
    if lower:
        ort_lowering.lower(model, dtype=torch.float32, window_offset=ort_probes.window_offset(), max_position=256,
                           attention=True, moe=False, load=None)
    else:
        trace.attach_functions(model)
    return session(model)


# (heads, kv_heads, head_dim, window, capacity, chunks): C = W with multi-token chunks and a chunk
# longer than C (read before write), C > W, full attention, GQA groups of 1 and 4.
ATTENTION_CASES = {
    "c_eq_w": (4, 2, 16, 4, 4, [3, 6, 1, 2, 1, 5, 1]),
    "c_gt_w": (4, 2, 16, 4, 7, [5, 1, 9, 1, 1, 3]),
    "full": (4, 1, 16, 0, 24, [5, 1, 3, 7, 1]),
    "mha": (2, 2, 8, 5, 6, [2, 8, 1, 1, 4]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_function_body(case):
    """Ragged rows (different start_pos in one call), garbage in never-written slots, S > C."""
    heads, kv_heads, d, window, cap, chunks = ATTENTION_CASES[case]
    sess = attention_session(heads, kv_heads, d, window, cap)
    g = torch.Generator().manual_seed(0)
    b, total = 2, sum(chunks) + 3
    q = torch.randn(b, total, heads * d, generator=g) * 2
    k = torch.randn(b, total, kv_heads * d, generator=g) * 2
    v = torch.randn(b, total, kv_heads * d, generator=g)
    garbage = torch.randn(b, kv_heads, cap, d, generator=g) * 3  # slots holding nothing are never read
    pk_ref, pv_ref = garbage.clone(), garbage.clone()
    pk, pv = garbage.numpy().copy(), garbage.numpy().copy()
    inv = ops.rope_inv_freq(d, 10000.0)
    start = torch.tensor([0, 3])  # row 1 runs 3 positions ahead of row 0: ragged start_pos
    for n in chunks:
        idx = torch.stack([torch.arange(s, s + n) for s in start.tolist()])
        qc, kc, vc = (t[torch.arange(b)[:, None], idx] for t in (q, k, v))
        ref, pk_ref, pv_ref = ops.swa_gqa(qc, kc, vc, pk_ref, pv_ref, start, inv, heads, kv_heads, window, d ** -0.5)
        out, pk, pv = sess.run(None, {"query": qc.numpy(), "key": kc.numpy(), "value": vc.numpy(), "past_key": pk,
                                      "past_value": pv, "start_pos": start.numpy()})
        np.testing.assert_allclose(out, ref.numpy(), atol=ATOL, rtol=1e-5)
        np.testing.assert_allclose(pk, pk_ref.numpy(), atol=ATOL, rtol=1e-5)
        np.testing.assert_allclose(pv, pv_ref.numpy(), atol=ATOL, rtol=1e-5)
        start = start + n


def moe_case(experts: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, i = 16, 24
    x = torch.randn(tokens, h, generator=g)
    x[0] = 0  # every router logit 0: an exact tie between all experts
    router = torch.randn(experts, h, generator=g)
    router[2] = router[1]  # experts 1 and 2 tie for every token
    w1, w3 = torch.randn(experts, i, h, generator=g) * 0.3, torch.randn(experts, i, h, generator=g) * 0.3
    w2 = torch.randn(experts, h, i, generator=g) * 0.3
    return x, {"router_weight": router, "w1": w1, "w3": w3, "w2": w2}


@pytest.mark.parametrize("lower", [False, True], ids=["function", "ort"])
@pytest.mark.parametrize("experts,top_k", [(4, 1), (4, 2), (8, 2), (3, 3)])
def test_moe(experts, top_k, lower):
    """Function body and ORT lowering: fp32 routing, ties to the lower expert index, SwiGLU; 3-D input."""
    x, weights = moe_case(experts, 7)
    x3 = x.reshape(1, 7, -1)
    model = single_op_model(names.MOE_OP, {"input": x3}, weights,
                            dict(top_k=top_k, plugin_version="1", plugin_namespace="mtx"), 1)
    if lower:
        ort_lowering.lower(model, dtype=torch.float32, window_offset=0, max_position=1, attention=False, moe=True,
                           load=lambda name: weights[name])
        assert [n.op_type for n in model.graph if n.domain == ort_lowering.MS_DOMAIN] == ["MoE"]
    else:
        trace.attach_functions(model)
    (out,) = session(model).run(None, {"input": x3.numpy()})
    ref = ops.moe_reference(x3, *weights.values(), top_k)
    np.testing.assert_allclose(out, ref.numpy(), atol=ATOL, rtol=1e-5)


def test_local_window_size_convention():
    """The exporter's empirical finding agrees with the documented change in ORT 1.24, and is sharp."""
    expected = 0 if Version(ort.__version__) >= Version("1.24") else 1
    assert ort_probes.window_offset() == expected
    chunks = [7, 2, 1, 1, 1, 1, 1]
    right = ort_probes._run_attention(torch.float32, 2, 1, 16, 4, 6, chunks, offset=expected)
    wrong = ort_probes._run_attention(torch.float32, 2, 1, 16, 4, 6, chunks, offset=1 - expected)
    assert right <= 1e-5 and wrong > 1e-2, (right, wrong)


@pytest.mark.parametrize("window,capacity", [(4, 4), (4, 9), (0, 32)])
def test_lowered_attention_batched(window, capacity):
    """GroupQueryAttention lowering, batch 2: first call together, later chunks row by row, ragged decode."""
    heads, kv_heads, d = 4, 2, 16
    sess = attention_session(heads, kv_heads, d, window, capacity, lower=True)
    g = torch.Generator().manual_seed(1)
    b, total = 2, 28
    q = torch.randn(b, total, heads * d, generator=g) * 2
    k = torch.randn(b, total, kv_heads * d, generator=g) * 2
    v = torch.randn(b, total, kv_heads * d, generator=g)
    inv = ops.rope_inv_freq(d, 10000.0)
    zeros = torch.zeros(b, kv_heads, capacity, d)
    ref_all, _, _ = ops.swa_gqa(q, k, v, zeros, zeros, torch.zeros(b, dtype=torch.long), inv, heads, kv_heads,
                                window, d ** -0.5)
    pk, pv = np.zeros(zeros.shape, np.float32), np.zeros(zeros.shape, np.float32)
    pos = [0, 0]

    def call(rows: list[int], n: int) -> None:
        sl = slice(rows[0], rows[-1] + 1)
        feeds = {name: torch.stack([t[r, pos[r]:pos[r] + n] for r in rows]).numpy()
                 for name, t in (("query", q), ("key", k), ("value", v))}
        feeds["start_pos"] = np.array([pos[r] for r in rows], np.int64)
        binding = sess.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for past, present, buf in (("past_key", "out1", pk), ("past_value", "out2", pv)):
            value = ort.OrtValue.ortvalue_from_numpy(buf[sl])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        binding.bind_output("out0")
        sess.run_with_iobinding(binding)
        out = binding.get_outputs()[-1].numpy()
        for i, r in enumerate(rows):
            np.testing.assert_allclose(out[i], ref_all[r, pos[r]:pos[r] + n].numpy(), atol=ATOL, rtol=1e-5)
            pos[r] += n

    call([0, 1], 5)
    call([0], 6)
    call([1], 2)
    for _ in range(8):
        call([0, 1], 1)  # rows at different positions in one call
    call([1], 5)
    call([0, 1], 1)


@pytest.mark.parametrize("dtype,head_dim,ok", [(torch.float32, 16, True), (torch.float32, 24, False),
                                               (torch.float16, 32, True), (torch.bfloat16, 16, False)])
def test_attention_capability(dtype, head_dim, ok):
    cap = ort_probes.attention_capability(dtype, 4, 2, head_dim, True)
    assert cap.ok == ok, cap.reason
    if not ok:
        assert ("multiple of 16" in cap.reason) if head_dim % 16 else ("bfloat16" in cap.reason)
