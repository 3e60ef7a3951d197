"""Ministral: per-layer attention windows (``layer_types``), docs/ops.md §1 "Per-layer windows".

The oracle is transformers' MinistralForCausalLM (one full forward, no cache) on the tiny checkpoint of
conftest.VARIANTS["ministral"]: layer 0 full attention, layers 1-3 a window of 8, prompts of 3-5x the
window. Every target, the Python runtime and the C++ runtime are compared with it (or with each other for
generated tokens); the KV buffers are sized per layer, and what needs one window refuses in one line.
"""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch

from conftest import hf_logits
from mtx import rolling_kv
from mtx.errors import UsageError
from mtx.manifest import read_manifest
from mtx.parity import ParityOptions, run_parity
from mtx.runtime.prefix_state import PrefixStateError, save_prefix_state
from test_cpp import PREFILL_CHUNK, PROMPT, check, py_load

ATOL = 1e-4
WINDOW = 8
KINDS = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
#: Chunked prefill of 30 tokens (chunks cross window boundaries), then 10 single-token calls: 40 positions, 5 W.
CALLS = [5, 7, 3, 8, 7] + [1] * 10
TARGETS = ["onnxruntime", "onnx", "tensorrt"]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (1, sum(CALLS)), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def oracle(ckpt_factory, ids) -> np.ndarray:
    """transformers' Ministral logits [T, V]; checked to differ from the same weights with one window for every
    layer, so a runtime that ignored layer_types fails against it."""
    folder = ckpt_factory("ministral")
    assert json.loads((folder / "config.json").read_text())["layer_types"] == KINDS
    ref = hf_logits(folder, ids)[0]
    uniform = folder.parent / "ministral-uniform"
    if not uniform.exists():
        uniform.mkdir()
        for f in folder.iterdir():
            (uniform / f.name).symlink_to(f)
        (uniform / "config.json").unlink()
        cfg = json.loads((folder / "config.json").read_text())
        (uniform / "config.json").write_text(json.dumps({**cfg, "layer_types": ["sliding_attention"] * 4}))
    assert (hf_logits(uniform, ids)[0] - ref).abs().max().item() > 1e-2
    return ref.numpy()


def run_calls(backend, ids: torch.Tensor) -> np.ndarray:
    """Logits [T, V] of ``ids`` fed through one row in CALLS."""
    state, out, pos = backend.new_state(1), [], 0
    for n in CALLS:
        out.append(backend.run(state, slice(0, 1), ids[:, pos:pos + n].numpy(), np.array([pos]), False)[0])
        pos += n
    return np.concatenate(out)


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_matches_transformers(parity_export, ckpt_factory, ids, oracle, target):
    """Each target past the window within 1e-4 of transformers' Ministral, with each layer's own window and
    capacity in the graph and the manifest."""
    out = parity_export("ministral", target)
    m = read_manifest(out, verify_hashes=True)
    assert m.config["layer_windows"] == [0, WINDOW, WINDOW, WINDOW] and m.config["model_type"] == "mistral"
    assert [(x.window, x.capacity) for x in m.layers] == [(0, 4096)] + [(WINDOW, WINDOW)] * 3
    assert m.window is None and m.capacity is None
    past = {s.name: s.shape[2] for s in m.inputs if s.name.startswith("past_")}
    assert past == {f"past_{k}.{l}": (4096 if l == 0 else WINDOW) for l in range(4) for k in ("key", "value")}
    if target == "onnxruntime":
        assert m.kv.layout == "per_layer" and m.attention_op == "com.microsoft::GroupQueryAttention"
        assert [x.layout for x in m.layers] == ["ring"] + ["ort_window"] * 3
        assert m.layers[0].local_window_size is None and m.local_window_size is None
        assert {x.local_window_size for x in m.layers[1:]} == {m.layers[1].local_window_size} != {None}
    else:
        assert m.kv.layout == "ring" and all(x.layout == "ring" for x in m.layers)
    gen = py_load(out)
    err = np.abs(run_calls(gen.backend, ids) - oracle).max()
    assert err <= ATOL, f"{target}: max abs diff {err:.3e} from transformers"
    # mtx parity (the reference is mtx's, the schedule follows the smallest window, stays in the context)
    report = run_parity(ckpt_factory("ministral"), out, ParityOptions(per_layer=True))
    assert report.passed and report.schedule.window == WINDOW and report.schedule.positions > 3 * WINDOW
    assert any("per-layer windows [0, 8, 8, 8]" in n for n in report.notes)


def test_torch_reference_and_mistral_layout_match_transformers(ckpt_factory, mistral_layout_factory, tmp_path,
                                                               ids, oracle):
    """The reference (runtime torch backend) and a mistral-inference folder whose params.json has the window
    list [null, 8, 8, 8] (exported for onnxruntime) give transformers' logits."""
    import mtx.runtime
    from mtx.exporter.core import export
    from mtx.exporter.options import ExportOptions

    gen = mtx.runtime.load(ckpt_factory("ministral"), backend="torch")
    assert gen.backend.kv_plan.capacities == (4096, WINDOW, WINDOW, WINDOW)
    assert np.abs(run_calls(gen.backend, ids) - oracle).max() <= ATOL
    folder = mistral_layout_factory("ministral")
    assert json.loads((folder / "params.json").read_text())["sliding_window"] == [None, WINDOW, WINDOW, WINDOW]
    out = export(folder, tmp_path / "out", ExportOptions(target="onnxruntime", cache_capacity=64)).out
    assert [x.capacity for x in read_manifest(out).layers] == [64, WINDOW, WINDOW, WINDOW]
    assert np.abs(run_calls(py_load(out).backend, ids) - oracle).max() <= ATOL


def test_kv_plan_sizes_each_layer():
    """plan_kv: sliding layers hold their window, full layers (and windows >= C) the context C; uniform
    models keep one capacity; a full layer bounds the context."""
    plan = rolling_kv.plan_kv([131072, 32768, 32768, 32768] * 9, 131072)  # Ministral-8B's pattern
    assert plan.windows[:4] == (0, 32768, 32768, 32768) and plan.capacities[:4] == (131072, 32768, 32768, 32768)
    assert plan.row_elements(8, 128) * 2 == 9 * 131072 * 4096 + 27 * 32768 * 4096  # bytes in bfloat16
    assert rolling_kv.plan_kv([131072, 32768] * 2, 131072, 32768).windows == (0, 0, 0, 0)  # a 32k context
    assert rolling_kv.plan_kv([8, 8], 4096, 12).capacities == (12, 12)  # uniform: one capacity, as before
    assert plan.context_limit(None) == 131072 and plan.context_limit(1000) == 1000
    with pytest.raises(UsageError, match="exceeds the KV capacity 131072"):
        plan.check_context(131073)
    with pytest.raises(UsageError, match="layers differ in KV window"):
        _ = plan.window


def test_context_past_the_full_layers_capacity_is_one_line(parity_export):
    out = parity_export("ministral", "onnxruntime", cache_capacity=32)
    assert [x.capacity for x in read_manifest(out).layers] == [32, WINDOW, WINDOW, WINDOW]
    gen = py_load(out)
    assert gen.backend.position_limit() == 32
    assert len(gen.generate([PROMPT], max_new_tokens=32 - len(PROMPT), stop_token_ids=[])[0]) == 32 - len(PROMPT)
    with pytest.raises(UsageError) as e:
        gen.generate([PROMPT], max_new_tokens=40, stop_token_ids=[])
    assert "32" in str(e.value) and "\n" not in str(e.value)


def test_prefix_caching_and_speculative_refuse_per_layer_windows(parity_export, tmp_path):
    """Rules 10-12 are for one window: prefix caching is off (status says why), speculative decoding and
    prefix state files are refused in one line; plain generation is unchanged."""
    out = parity_export("ministral", "onnxruntime")
    gen = py_load(out)
    assert gen.prefix_cache is None and "differ in KV window" in gen.prefix_cache_status
    with pytest.raises(UsageError, match="layers differ in KV window or capacity .*speculative decoding"):
        gen.generate([PROMPT], max_new_tokens=5, speculative=3)
    with pytest.raises(UsageError, match="layers differ"):
        py_load(out, prefix_cache_bytes=1 << 20)
    s = gen.session()
    s.append(PROMPT)
    with pytest.raises(UsageError, match="layers differ"):
        s.prefix_state()
    with pytest.raises(PrefixStateError, match="prefix state files need one window"):
        save_prefix_state(tmp_path / "x.safetensors", None, read_manifest(out))  # refused before the state is read


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
def test_cpp_runtime_generates_pythons_tokens(cpp_build, parity_export, tmp_path, target):
    """Greedy tokens, seeded sampling and the logits of a whole sequence (C++ vs Python, past 3 wraps of the
    window); KV memory is the per-layer sum; speculative decoding refused in one line."""
    export = parity_export("ministral", target)
    gen = py_load(export)
    want = gen.generate([PROMPT], max_new_tokens=30, stop_token_ids=[])[0]
    got = check(cpp_build, tmp_path, {"op": "generate", "export": str(export), "prompts": [PROMPT],
                                      "max_new_tokens": 30, "stop": [], "prefill_chunk": PREFILL_CHUNK})
    assert got["tokens"][0] == want
    params = dict(temperature=0.9, top_k=20, seed=7)
    s = gen.session()
    s.append(PROMPT)
    sampled = s.generate(30, stop_token_ids=[], **params)
    got = check(cpp_build, tmp_path, {"op": "generate", "export": str(export), "prompts": [PROMPT],
                                      "max_new_tokens": 30, "stop": [], "sampling": params,
                                      "prefill_chunk": PREFILL_CHUNK})
    assert got["tokens"][0] == sampled
    seq = PROMPT + want
    ref = gen.score(seq)
    out = tmp_path / f"logits-{target}.bin"
    check(cpp_build, tmp_path, {"op": "score", "export": str(export), "tokens": seq, "out": str(out),
                                "prefill_chunk": PREFILL_CHUNK})
    np.testing.assert_allclose(np.fromfile(out, dtype=np.float32).reshape(ref.shape), ref, rtol=0, atol=1e-5)
    m = json.loads((export / "mtx.json").read_text())
    sets = 1 if m["kv"]["past_present"] == "shared" and not m["attention_op"].startswith("mtx::") else 2
    expect = sets * 2 * 2 * 16 * 4 * sum(x["capacity"] for x in m["layers"])  # Hkv 2, D 16, float32
    state = gen.backend.new_state(1)
    assert gen.backend.state_nbytes(state) == expect
    kv = check(cpp_build, tmp_path, {"op": "kv", "export": str(export), "prompt": PROMPT, "windows": 2,
                                     "prefill_chunk": PREFILL_CHUNK})
    assert set(kv["kv_bytes"]) == {expect}
    err = check(cpp_build, tmp_path, {"op": "generate", "export": str(export), "prompts": [PROMPT],
                                      "max_new_tokens": 5, "stop": [], "prefill_chunk": PREFILL_CHUNK,
                                      "speculative": {"num_tokens": 3}}, expect_error=True)
    assert "layers differ in KV window" in json.dumps(err)
