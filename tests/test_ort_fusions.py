"""The onnxruntime target's fusions happen (packed QKV, Skip+RMSNorm) and keep parity with the reference."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch

from mtx.exporter.core import export
from mtx.exporter.options import ExportOptions
from mtx.models import build_model


@pytest.mark.parametrize("name", ["mistral", "mixtral4"])
def test_fused_graph(ckpt_factory, tmp_path, name):
    folder = ckpt_factory(name)
    out = tmp_path / "out"
    export(folder, out, ExportOptions(target="onnxruntime"))
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    layers = 2
    assert ops["GroupQueryAttention"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers  # every norm after a residual sum
    assert ops["Pow"] == 1  # only the embedding's norm stays as traced
    producers = {o: n for n in proto.graph.node for o in n.output}
    for gqa in (n for n in proto.graph.node if n.op_type == "GroupQueryAttention"):
        assert gqa.input[1] == "" and gqa.input[2] == ""  # packed QKV
        mm = producers[gqa.input[0]]
        assert mm.op_type == "MatMul"
        w = producers[mm.input[1]].input[0]
        assert w.endswith(".attn.wqkv.weight")

    # numerics: a chunked prefill then decoding past the window, against the PyTorch reference
    import mtx.runtime

    gen = mtx.runtime.load(out, prefill_chunk=6)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    ref_model = build_model(folder, "float32")
    kv = ref_model.new_kv(1)
    with torch.no_grad():
        ref = torch.cat([ref_model(ids[:, s:s + 6], torch.tensor([s]), kv) for s in range(0, 30, 6)], 1)[0]
    s = gen.session()
    got = s.append(ids[0, :12].tolist(), want_all=True)
    got = np.concatenate([got] + [s.append([int(t)], want_all=True) for t in ids[0, 12:]])
    assert np.abs(got - ref.numpy()).max() <= 1e-4
