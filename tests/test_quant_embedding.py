"""The quantised embedding table (docs/ops.md §7): ONNX Runtime's GatherBlockQuantized contract, the
embedding every target computes, the manifest entries, tied tables and parity.

Every expectation comes from the numpy block quantiser of tests/test_quantize.py (a transcription of
§7, independent of mtx.quantize) applied to the checkpoint's own float table, read with safetensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

from mtx.manifest import read_manifest
from mtx.parity import run_parity
from mtx.parity.options import ParityOptions

from test_quantize import ATOL, np_quantize

MS = "com.microsoft"


def _pack(u: np.ndarray) -> np.ndarray:
    """Codes < 16 [..., 2m] -> bytes [..., m], the even element in the low nibble."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _blocked(w: np.ndarray, bits: int, bs: int, scheme: str, scale_dtype=np.float32):
    """The numpy quantiser's result in GatherBlockQuantized's layout: (data [V, kb*bs*bits/8], scales [V, kb],
    packed zero points or None, ŵ [V, K] in scale_dtype)."""
    codes, scales, zeros, deq = np_quantize(w, bits, bs, scheme, scale_dtype)
    v, k = codes.shape
    kb = scales.shape[1]
    padded = np.repeat(zeros, bs, axis=1).astype(np.uint8)  # the short last block holds the zero point
    padded[:, :k] = codes
    data = _pack(padded) if bits == 4 else padded
    z = _pack(np.pad(zeros, ((0, 0), (0, kb % 2)))) if bits == 4 else zeros
    return data, scales, (None if scheme == "symmetric" else z), deq.astype(scale_dtype)


def _session(nodes, inputs, outputs, inits) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)])
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------------
# ONNX Runtime's contract, as docs/ops.md §7 states it


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scheme", ["asymmetric", "symmetric"])
@pytest.mark.parametrize("k,bs", [(64, 32), (96, 64), (64, 128), (256, 128)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gather_block_quantized_contract(bits, scheme, k, bs, dtype):
    """uint8 data [V, kb*bs*bits/8], scales [V, kb], packed zero points (default 2^(bits-1)): rows of ŵ,
    whole blocks (sliced to K here), exactly; out-of-range ids give zeros, negative ones wrap."""
    v = 37
    w = np.random.default_rng(bits * k + bs).standard_normal((v, k)).astype(np.float32)
    data, scales, zeros, deq = _blocked(w, bits, bs, scheme, dtype)
    inits = [numpy_helper.from_array(data, "data"), numpy_helper.from_array(scales, "scales")]
    inputs = ["data", "ids", "scales"]
    if zeros is not None:
        inits.append(numpy_helper.from_array(zeros, "zp"))
        inputs.append("zp")
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    sess = _session([helper.make_node("GatherBlockQuantized", inputs, ["y"], domain=MS, gather_axis=0,
                                      quantize_axis=1, block_size=bs, bits=bits)],
                    [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                    [helper.make_tensor_value_info("y", elem, None)], inits)
    ids = np.array([[0, 5, v - 1], [7, 7, 2]], np.int64)
    (y,) = sess.run(None, {"ids": ids})
    kb = scales.shape[1]
    assert y.shape == (2, 3, kb * bs) and y.dtype == dtype
    np.testing.assert_array_equal(y[..., :k], deq[ids])
    np.testing.assert_array_equal(y[..., k:], 0)  # padding dequantises to 0
    (edge,) = sess.run(None, {"ids": np.array([[v, -1]], np.int64)})
    np.testing.assert_array_equal(edge[0, 0], 0)  # out of range: zeros, no error (runtimes check ids first)
    np.testing.assert_array_equal(edge[0, 1, :k], deq[v - 1])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,bs", [(64, 32), (96, 64), (64, 128)])
def test_tied_lm_head_reads_the_gather_codes(bits, k, bs):
    """MatMulNBits over Reshape(codes, [V, kb, blob]) with the same scales and zero points: x · ŵᵀ."""
    v = 40
    rng = np.random.default_rng(bits + k)
    w = rng.standard_normal((v, k)).astype(np.float32)
    data, scales, zeros, deq = _blocked(w, bits, bs, "asymmetric")
    kb, blob = scales.shape[1], bs * bits // 8
    sess = _session(
        [helper.make_node("Reshape", ["data", "shape"], ["b"]),
         helper.make_node("MatMulNBits", ["x", "b", "scales", "zp"], ["logits"], domain=MS, K=k, N=v, bits=bits,
                          block_size=bs, accuracy_level=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(data, "data"), numpy_helper.from_array(scales, "scales"),
         numpy_helper.from_array(zeros, "zp"), numpy_helper.from_array(np.array([v, kb, blob], np.int64), "shape")])
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    (got,) = sess.run(None, {"x": x})
    np.testing.assert_allclose(got, x @ deq.T, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Exports: the embedding each target computes, against numpy ŵ[ids]


def _checkpoint_table(folder: Path) -> np.ndarray:
    tensors = load_file(str(folder / "model.safetensors"))
    return tensors["model.embed_tokens.weight"].astype(np.float32)


def _embedding_output(out: Path, ids: np.ndarray) -> np.ndarray:
    """The export's value ``embedding`` (the gathered rows, [1, S, H]), fetched as an extra graph output."""
    m = read_manifest(out)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    producer = next(n for n in proto.graph.node if "embedding" in n.output)
    assert "input_ids" in producer.input or producer.op_type == "Slice"
    elem = TensorProto.FLOAT if m.dtype == "float32" else TensorProto.FLOAT16
    proto.graph.output.append(helper.make_tensor_value_info("embedding", elem, None))
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(out))
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    np_dtype = np.float32 if m.dtype == "float32" else np.float16
    c, kvh, d = m.capacity, m.config["num_kv_heads"], m.config["head_dim"]
    feeds = {"input_ids": ids[None], "start_pos": np.zeros(1, np.int64)}
    for layer in range(m.config["num_layers"]):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{layer}"] = np.zeros((1, kvh, c, d), np_dtype)
    return sess.run(["embedding"], feeds)[0][0]


EXPORTS = [("mistral", "onnxruntime", dict(quantize="int4")),  # block 128 > H = 64: a short (sliced) block
           ("mistral", "onnxruntime", dict(quantize="int4", embedding_bits=4)),
           ("mistral", "onnxruntime", dict(quantize="int8", block_size=32)),
           ("mistral", "onnxruntime", dict(quantize="int4", block_size=32, quant_scheme="symmetric",
                                           dtype="float16", embedding_bits=4)),
           ("mistral", "onnxruntime", dict(quantize="int4", block_size=64, quant_scheme="symmetric",
                                           dtype="float16")),
           ("mistral", "onnx", dict(quantize="int4", block_size=64, embedding_bits=4)),
           ("mistral", "onnx", dict(quantize="int8", quant_scheme="symmetric")),
           ("mistral", "tensorrt", dict(quantize="int4", block_size=32, embedding_bits=4)),
           ("mistral", "tensorrt", dict(quantize="int8", block_size=64)),
           ("mixtral4", "onnxruntime", dict(quantize="int4", block_size=32)),
           ("tied", "onnxruntime", dict(quantize="int4", block_size=32)),
           ("tied", "onnxruntime", dict(quantize="int8", lm_head_bits=4)),
           ("tied", "onnx", dict(quantize="int8", block_size=32)),
           ("tied", "tensorrt", dict(quantize="int4", lm_head_bits=4))]


@pytest.mark.parametrize("variant,target,options", EXPORTS,
                         ids=[f"{v}-{t}-{i}" for i, (v, t, _) in enumerate(EXPORTS)])
def test_exported_embedding_equals_numpy_dequantised_rows(parity_export, ckpt_factory, variant, target, options):
    out = parity_export(variant, target, **options)
    m = read_manifest(out, verify_hashes=True)
    q = m.quantization
    tied = m.config.get("tie_word_embeddings", False)
    entry = next(t for t in q.tensors if t.weight == "embed.weight")
    bits = options.get("lm_head_bits", 8) if tied else options.get("embedding_bits", 8)
    op = {"onnxruntime": f"{MS}::GatherBlockQuantized"}.get(target, "ai.onnx::DequantizeLinear")
    assert (entry.bits, entry.op, entry.sources) == (bits, op, ["embed.weight"])
    assert entry.shape == [m.config["vocab_size"], m.config["hidden_size"]]
    assert (entry.zero_points is None) == (q.scheme == "symmetric" and target == "onnxruntime")

    table = _checkpoint_table(ckpt_factory(variant))
    dtype = np.float32 if m.dtype == "float32" else np.float16
    *_, deq = np_quantize(table, bits, q.block_size, q.scheme, dtype)
    ids = np.array([0, 3, 17, m.config["vocab_size"] - 1, 3, 64], np.int64)
    got = _embedding_output(out, ids)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, deq.astype(dtype)[ids])
    assert np.abs(got.astype(np.float32) - table[ids]).max() > 0  # really quantised


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
def test_tied_table_is_held_once(parity_export, target):
    """One entry, one set of codes feeding the gather and the lm_head; no float table, no output.weight."""
    out = parity_export("tied", target, quantize="int4", block_size=32)
    m = read_manifest(out)
    q = m.quantization
    assert q.lm_head and [t.weight for t in q.tensors if t.weight in ("embed.weight", "output.weight")] \
        == ["embed.weight"]
    entry = next(t for t in q.tensors if t.weight == "embed.weight")
    assert entry.bits == 8  # the lm_head's width (--lm-head-bits default)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    assert "embed.weight" not in inits and not any(n.startswith("output.") for n in inits)
    users = [n for n in proto.graph.node if entry.codes in n.input]
    logits = next(n for n in proto.graph.node if "logits" in n.output)
    if target == "onnxruntime":
        assert sorted(n.op_type for n in users) == ["GatherBlockQuantized", "Reshape"]
        reshape = next(n for n in users if n.op_type == "Reshape")
        assert logits.op_type == "MatMulNBits" and logits.input[1] == reshape.output[0]
        assert logits.input[2:] == [entry.scales, entry.zero_points]
    else:
        (dq,) = users
        readers = sorted(n.op_type for n in proto.graph.node if dq.output[0] in n.input)
        assert dq.op_type == "DequantizeLinear" and readers == ["Gather", "Transpose"]


@pytest.mark.parametrize("variant,options,float_table", [
    ("mistral", dict(quantize_embedding=False), True),
    ("tied", dict(embedding_bits=4), False),  # a tied table takes the lm_head's width
    ("tied", dict(quantize_lm_head=False), True),
    ("tied", dict(quantize_embedding=False), True),
    ("mistral", dict(quantize_lm_head=False), False),
])
def test_embedding_options(parity_export, variant, options, float_table):
    """--no-quantize-embedding keeps the table in T; a tied table stays in T unless both are quantised."""
    out = parity_export(variant, "onnxruntime", quantize="int4", block_size=32, **options)
    m = read_manifest(out)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    names = [t.weight for t in m.quantization.tensors]
    assert ("embed.weight" in inits) == float_table and ("embed.weight" in names) == (not float_table)
    for t in m.quantization.tensors:
        if t.weight == "embed.weight":
            assert t.bits == (8 if variant == "tied" else options.get("embedding_bits", 8))
    assert m.quantization.lm_head == ("output.weight" in names or (variant == "tied" and not float_table))


@pytest.mark.parametrize("variant,target,options", [
    ("tied", "onnxruntime", dict(quantize="int4", block_size=32, accuracy_level=0)),
    ("mistral", "onnx", dict(quantize="int4", block_size=64)),
    ("mistral_full", "onnxruntime", dict(quantize="int8", accuracy_level=0)),
])
def test_parity_of_quantised_embedding_exports(parity_export, variant, target, options):
    """mtx parity: the fake-quant reference (embedding rows and tied lm_head from ŵ) and the torch backend."""
    out = parity_export(variant, target, **options)
    ckpt = Path(read_manifest(out).checkpoint["path"])
    report = run_parity(ckpt, out, ParityOptions(backends=("onnxruntime", "torch"), steps=30))
    assert report.passed, [(b.name, float(b.logits["max_abs"].max())) for b in report.ran]
    assert max(float(b.logits["max_abs"].max()) for b in report.ran) <= ATOL
