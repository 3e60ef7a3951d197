"""mtx.tensorrt, the engine build (mtx.exporter.tensorrt_engine), the engine run (mtx.runtime.trt_backend)
and the TensorRT plugins.

Runs everywhere: plugin discovery, the availability report, and the post-parse check that the
network holds one plugin layer per mtx node. Marker ``tensorrt`` (skipped with a
reason without a GPU, the tensorrt package and libmtx_trt_plugins.so):

* one-node ONNX graphs (an mtx::SlidingWindowGQA node, an mtx::MoE node) parsed by the TensorRT ONNX
  parser into the mtx plugins, built and run, against mtx.models.ops — including the in-place update
  of the KV buffers over several calls;
* an exported model (docs/ops.md §4; MTX_TEST_ONNX names it) as a TensorRT engine against ONNX Runtime
  on the same ONNX file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mtx import tensorrt as mtrt
from mtx.exporter.tensorrt_engine import build_engine, check_plugin_layers, mtx_nodes
from mtx.models import ops
from mtx.runtime.trt_backend import TrtRunner, aliased_input


def test_plugin_library_from_environment(tmp_path, monkeypatch):
    fake = tmp_path / "libmtx_trt_plugins.so"
    fake.write_bytes(b"\x7fELF")
    monkeypatch.setenv("MTX_TRT_PLUGIN_LIB", str(fake))
    assert mtrt.plugin_library_path() == fake
    monkeypatch.setenv("MTX_TRT_PLUGIN_LIB", str(tmp_path / "missing.so"))
    assert mtrt.plugin_library_path() is None
    monkeypatch.delenv("MTX_TRT_PLUGIN_LIB")
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "libmtx_trt_plugins.so").write_bytes(b"\x7fELF")
    monkeypatch.setenv("MTX_PLUGIN_BUILD_DIR", str(tmp_path))
    assert mtrt.plugin_library_path() == tmp_path / "tensorrt" / "libmtx_trt_plugins.so"


def test_available_explains_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("MTX_TRT_PLUGIN_LIB", str(tmp_path / "missing.so"))
    ok, why = mtrt.available()
    assert ok is False and why
    assert "tensorrt" in why or "libmtx_trt_plugins.so" in why
    with pytest.raises(mtrt.TensorRTError, match="tensorrt|libmtx_trt_plugins"):
        mtrt.load_plugins()


def test_present_outputs_alias_past_inputs():
    assert aliased_input("present_key.3") == "past_key.3"
    assert aliased_input("present_value.0") == "past_value.0"
    assert aliased_input("logits") is None


def test_minimum_tensorrt_is_the_one_in_cmake():
    """One minimum: mtx.tensorrt.MIN_TENSORRT and plugins/tensorrt/CMakeLists.txt agree (10.7: the ONNX
    parser prefers the plugins to the nodes' function bodies)."""
    import re

    cmake = (Path(__file__).resolve().parents[1] / "plugins" / "tensorrt" / "CMakeLists.txt").read_text()
    assert re.search(r"set\(MTX_MIN_TENSORRT (\d+)\.(\d+)\)", cmake).groups() == tuple(map(str, mtrt.MIN_TENSORRT))
    assert mtrt.MIN_TENSORRT >= (10, 7)


def test_engine_build_requires_one_plugin_layer_per_mtx_node(tmp_path, parity_export):
    """The counts come from the exported graph; a network whose mtx nodes were inlined (no plugin layers),
    or that has a plugin layer too few or of another op, fails the build with a message."""
    out = parity_export("mixtral4", "tensorrt")
    nodes = mtx_nodes(out / "model.onnx")
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    layers = sum(1 for n in graph.node if n.op_type == "SlidingWindowGQA")
    assert nodes == {"SlidingWindowGQA": layers, "MoE": layers} and layers > 0
    good = [("LayerType.PLUGIN_V3", op) for op, n in nodes.items() for _ in range(n)]
    check_plugin_layers(nodes, good, "model.onnx")
    check_plugin_layers(nodes, [(t, None) for t, _ in good], "model.onnx")  # names unreadable: counted
    for bad in ([], good[:-1], good[1:] + [("LayerType.PLUGIN_V3", "other:Foo")], good + good[:1]):
        with pytest.raises(mtrt.TensorRTError, match="did not map every mtx node"):
            check_plugin_layers(nodes, bad, "model.onnx")


# ------------------------------------------------------------------ TensorRT (GPU)


def need_tensorrt(what: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU: would {what}")
    ok, why = mtrt.available()
    if not ok:
        pytest.skip(f"{why}: would {what}")


def _onnx_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    return {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
            torch.bfloat16: TensorProto.BFLOAT16}[dtype]


def swa_node_model(path: Path, hq: int, hkv: int, d: int, cap: int, window: int, dtype: torch.dtype) -> None:
    """An ONNX graph with one mtx::SlidingWindowGQA node (docs/ops.md §2), dynamic batch and seq."""
    import onnx
    from onnx import TensorProto, helper

    t = _onnx_dtype(dtype)
    inputs = [helper.make_tensor_value_info("query", t, ["B", "S", hq * d]),
              helper.make_tensor_value_info("key", t, ["B", "S", hkv * d]),
              helper.make_tensor_value_info("value", t, ["B", "S", hkv * d]),
              helper.make_tensor_value_info("past_key", t, ["B", hkv, cap, d]),
              helper.make_tensor_value_info("past_value", t, ["B", hkv, cap, d]),
              helper.make_tensor_value_info("start_pos", TensorProto.INT64, ["B"]),
              helper.make_tensor_value_info("inv_freq", TensorProto.FLOAT, [d // 2])]
    outputs = [helper.make_tensor_value_info("output", t, ["B", "S", hq * d]),
               helper.make_tensor_value_info("present_key", t, ["B", hkv, cap, d]),
               helper.make_tensor_value_info("present_value", t, ["B", hkv, cap, d])]
    node = helper.make_node("SlidingWindowGQA", [i.name for i in inputs], [o.name for o in outputs], domain="mtx",
                            num_heads=hq, num_kv_heads=hkv, window=window, scale=d ** -0.5,
                            plugin_version="1", plugin_namespace="mtx")
    graph = helper.make_graph([node], "swa", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("mtx", 1)])
    onnx.save(model, path)


def moe_node_model(path: Path, h: int, inter: int, e: int, k: int, dtype: torch.dtype, weights) -> None:
    import onnx
    from onnx import helper, numpy_helper

    t = _onnx_dtype(dtype)
    x = helper.make_tensor_value_info("input", t, ["N", h])
    y = helper.make_tensor_value_info("output", t, ["N", h])
    inits = []
    for name, w in zip(("router_weight", "w1", "w3", "w2"), weights):
        arr = w.float().cpu().numpy() if dtype == torch.float32 else w.cpu().view(torch.int16).numpy()
        tensor = numpy_helper.from_array(arr, name)
        if dtype != torch.float32:
            tensor.data_type = t
        inits.append(tensor)
    node = helper.make_node("MoE", ["input", "router_weight", "w1", "w3", "w2"], ["output"], domain="mtx", top_k=k,
                            plugin_version="1", plugin_namespace="mtx")
    graph = helper.make_graph([node], "moe", [x], [y], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("mtx", 1)]),
              path)


TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


@pytest.mark.tensorrt
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_swa_gqa_plugin_against_reference(tmp_path, dtype, capfd):
    need_tensorrt("build a TensorRT engine of one mtx::SlidingWindowGQA node (plugin from libmtx_trt_plugins.so) "
                  "and compare it, and its in-place KV update over prefill + decode calls, with mtx.models.ops")
    hq, hkv, d, cap, window = 8, 2, 128, 64, 48
    swa_node_model(tmp_path / "swa.onnx", hq, hkv, d, cap, window, dtype)
    shapes = {"query": [(1, 1, hq * d), (2, 8, hq * d), (2, 80, hq * d)],
              "key": [(1, 1, hkv * d), (2, 8, hkv * d), (2, 80, hkv * d)],
              "value": [(1, 1, hkv * d), (2, 8, hkv * d), (2, 80, hkv * d)],
              "past_key": [(1, hkv, cap, d), (2, hkv, cap, d), (2, hkv, cap, d)],
              "past_value": [(1, hkv, cap, d), (2, hkv, cap, d), (2, hkv, cap, d)],
              "start_pos": [(1,), (2,), (2,)], "inv_freq": [(d // 2,)] * 3}
    engine = build_engine(tmp_path / "swa.onnx", tmp_path / "swa.engine", dtype=str(dtype).split(".")[1],
                               shapes=shapes)
    runner = TrtRunner(engine)
    g = torch.Generator(device="cuda").manual_seed(0)
    kb = torch.zeros(2, hkv, cap, d, dtype=dtype, device="cuda")
    vb = torch.zeros_like(kb)
    rk, rv = kb.clone(), vb.clone()
    inv = ops.rope_inv_freq(d, 1e6).cuda()
    pos = torch.tensor([0, 0], device="cuda")
    for s in (70, 1, 1, 9, 1):  # prefill past the window, then decode and a short chunk (wrapping)
        q = torch.randn(2, s, hq * d, generator=g, device="cuda").to(dtype)
        k = torch.randn(2, s, hkv * d, generator=g, device="cuda").to(dtype)
        v = torch.randn(2, s, hkv * d, generator=g, device="cuda").to(dtype)
        ref = ops.swa_gqa_inplace(q, k, v, rk, rv, pos, inv, hq, hkv, window, d ** -0.5)
        out = runner.run(dict(query=q, key=k, value=v, past_key=kb, past_value=vb, start_pos=pos, inv_freq=inv))
        torch.cuda.synchronize()
        assert out["present_key"].data_ptr() == kb.data_ptr()
        torch.testing.assert_close(out["output"].float(), ref.float(), **TOL[dtype])
        torch.testing.assert_close(kb.float(), rk.float(), **TOL[dtype])
        assert torch.equal(vb, rv)
        kb.copy_(rk)
        pos = pos + s
    # Settles docs/ops.md §4's open question for this TensorRT: the plugin warns once when TensorRT
    # hands it present_* buffers apart from past_* (an inserted copy of every KV buffer per call).
    log = capfd.readouterr().err
    assert "are not aliased" not in log, "TensorRT copies the KV buffers around the plugin: " + log[-500:]


@pytest.mark.tensorrt
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_moe_plugin_against_reference(tmp_path, dtype):
    need_tensorrt("build a TensorRT engine of one mtx::MoE node (64 experts, top-6) and compare it with "
                  "mtx.models.ops.moe_reference")
    h, inter, e, k = 256, 128, 64, 6
    g = torch.Generator(device="cuda").manual_seed(0)
    router = (torch.randint(-16, 17, (e, h), generator=g, device="cuda") / 64).to(dtype)
    w1 = (torch.randn(e, inter, h, generator=g, device="cuda") * h ** -0.5).to(dtype)
    w3 = (torch.randn(e, inter, h, generator=g, device="cuda") * h ** -0.5).to(dtype)
    w2 = (torch.randn(e, h, inter, generator=g, device="cuda") * inter ** -0.5).to(dtype)
    moe_node_model(tmp_path / "moe.onnx", h, inter, e, k, dtype, (router, w1, w3, w2))
    engine = build_engine(tmp_path / "moe.onnx", tmp_path / "moe.engine", dtype=str(dtype).split(".")[1],
                               shapes={"input": [(1, h), (16, h), (300, h)]})
    runner = TrtRunner(engine)
    for n in (1, 5, 300):
        x = (torch.randint(-16, 17, (n, h), generator=g, device="cuda") / 16).to(dtype)
        got = runner.run({"input": x})["output"]
        torch.cuda.synchronize()
        torch.testing.assert_close(got.float(), ops.moe_reference(x, router, w1, w3, w2, k).float(), **TOL[dtype])


@pytest.mark.tensorrt
def test_engine_matches_onnxruntime_on_exported_model(tmp_path):
    what = ("build a TensorRT engine from the exported model.onnx named by MTX_TEST_ONNX (mtx::SlidingWindowGQA / "
            "mtx::MoE nodes, inputs per docs/ops.md §4, target onnx) and compare logits and present_* with "
            "ONNX Runtime on the same file over a prefill and two decode calls")
    need_tensorrt(what)
    path = os.environ.get("MTX_TEST_ONNX")
    if not path or not Path(path).is_file():
        pytest.skip(f"MTX_TEST_ONNX does not name an exported model.onnx: would {what}")
    import onnx
    import onnxruntime as ort

    model = onnx.load(path, load_external_data=False)
    elem = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    from onnx import TensorProto

    tdt = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
           TensorProto.BFLOAT16: torch.bfloat16}[elem["past_key.0"]]
    if tdt == torch.bfloat16:
        pytest.skip(f"{path} is bfloat16, which ONNX Runtime's CPU provider cannot run: would {what}")
    engine = build_engine(path, tmp_path / "model.engine", dtype=str(tdt).split(".")[1],
                               batch=(1, 2, 2), seq=(1, 16, 32))
    runner = TrtRunner(engine)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    layers = sorted(n for n in dims if n.startswith("past_key."))
    kv_shape = [2] + dims["past_key.0"][1:]
    trt_kv = {n: torch.zeros(kv_shape, dtype=tdt, device="cuda") for n in layers + [n.replace("key", "value")
                                                                                    for n in layers]}
    ort_kv = {n: t.float().cpu().numpy() for n, t in trt_kv.items()}
    g = torch.Generator().manual_seed(0)
    pos = 0
    for s in (16, 1, 1):
        ids = torch.randint(0, 100, (2, s), generator=g)
        start = torch.full((2,), pos, dtype=torch.int64)
        feeds = {"input_ids": ids.numpy(), "start_pos": start.numpy()}
        feeds.update({n: v.astype(np.float32 if tdt == torch.float32 else np.float16) for n, v in ort_kv.items()})
        ort_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        trt_out = runner.run({"input_ids": ids.cuda(), "start_pos": start.cuda(), **trt_kv})
        torch.cuda.synchronize()
        torch.testing.assert_close(trt_out["logits"].float().cpu(), torch.from_numpy(ort_out["logits"]).float(),
                                   atol=5e-2 if tdt != torch.float32 else 1e-3, rtol=5e-2)
        for n in list(ort_kv):
            present = n.replace("past", "present")
            torch.testing.assert_close(trt_kv[n].float().cpu(), torch.from_numpy(ort_out[present]).float(),
                                       atol=5e-2 if tdt != torch.float32 else 1e-3, rtol=5e-2)
            ort_kv[n] = ort_out[present]
        pos += s
