"""Exported models of every target, run in ONNX Runtime on CPU, against the PyTorch reference model.

The oracle is mtx.models (build_model + eager forward over a rolling buffer), whose parity with
transformers is tested in test_parity_hf.py. Sequences: batch 2, a 20-token prompt in chunks of
6-7, then 26 single-token decode steps: past 3 wraps of the window of 8.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtx.exporter.core import export
from mtx.exporter.options import ExportOptions
from mtx.manifest import read_manifest
from mtx.runtime.ort_backend import OrtBackend
from mtx import synthetic_checkpoints as make_checkpoint
from mtx.models import build_model

ATOL = 1e-4
PROMPT = [6, 7, 7]
DECODE = 26
SCHEDULE = PROMPT + [1] * DECODE
TOTAL = sum(SCHEDULE)
TARGETS = ["onnxruntime", "onnx", "tensorrt"]
FULL_CAPACITY = 64  # full attention: the whole sequence must fit


@pytest.fixture(scope="module")
def exported(ckpt_factory, tmp_path_factory):
    """exported(variant, target, **options) -> export folder (made once per module)."""
    cache: dict[tuple, Path] = {}

    def make(variant: str, target: str, checkpoint: Path | None = None, **options) -> Path:
        key = (variant, target, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / f"{variant}-{target}"
            if variant.endswith("full"):
                options.setdefault("cache_capacity", FULL_CAPACITY)
            export(checkpoint or ckpt_factory(variant), out, ExportOptions(target=target, **options))
            cache[key] = out
        return cache[key]

    return make


def token_ids(vocab: int = 128, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, TOTAL), generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _reference(folder: Path, seed: int, vocab: int, capacity: int, window: int | None, dtype: str) -> np.ndarray:
    return reference_logits(folder, token_ids(vocab, seed=seed), capacity, window, dtype)


def reference_logits(folder: Path, ids: torch.Tensor, capacity: int, window: int | None = None,
                     dtype: str = "float32") -> np.ndarray:
    """Eager reference model over a rolling buffer of ``capacity`` slots, fed in SCHEDULE chunks."""
    model = build_model(folder, dtype)
    if window is not None:
        for layer in model.layers:
            layer.attn.window = window
    return chunked_logits(model, ids, capacity, SCHEDULE)


def chunked_logits(model: torch.nn.Module, ids: torch.Tensor, capacity: int, schedule: list[int]) -> np.ndarray:
    """Logits [b, T, V] (float32) of ``model`` fed ``ids`` [b, T] in ``schedule`` chunks over a rolling
    buffer of ``capacity`` slots, every row from position 0."""
    b = ids.shape[0]
    kv = model.new_kv(b, capacity)
    out, pos = [], 0
    with torch.no_grad():
        for n in schedule:
            out.append(model(ids[:, pos:pos + n], torch.full((b,), pos, dtype=torch.long), kv).float())
            pos += n
    return torch.cat(out, dim=1).numpy()


def ort_stepper(out: Path, batch: int):
    """step(input_ids [b, S], start_pos [b], rows) -> logits [b, S, V]: ONNX Runtime over ``batch`` KV rows."""
    backend = OrtBackend(out, read_manifest(out), max_batch=batch)
    state = backend.new_state(batch)

    def step(input_ids: np.ndarray, start_pos: np.ndarray, rows: slice | None = None) -> np.ndarray:
        rows = rows or slice(0, len(input_ids))
        return backend.run(state, rows, np.asarray(input_ids, np.int64), np.asarray(start_pos, np.int64),
                           last_only=False)
    return step


def exported_logits(out: Path, ids: torch.Tensor) -> np.ndarray:
    b = ids.shape[0]
    step = ort_stepper(out, b)
    logits, pos = [], 0
    for n in SCHEDULE:
        logits.append(step(ids[:, pos:pos + n].numpy(), np.full(b, pos)))
        pos += n
    return np.concatenate(logits, axis=1).astype(np.float32)


def max_error(out: Path, folder: Path, window: int | None = None) -> float:
    """Max |logits| difference between the export (ORT) and the reference, same tokens and schedule."""
    m = read_manifest(out)
    vocab = m.config["vocab_size"]
    ref = _reference(Path(folder), 0, vocab, m.capacity, window, m.dtype)
    return float(np.abs(exported_logits(out, token_ids(vocab)) - ref).max())


def per_layer(manifest, op: str) -> int:
    return manifest.ops.get(op, 0)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("variant", ["mistral", "mistral_full", "mixtral4"])
def test_parity(exported, ckpt_factory, variant, target):
    out = exported(variant, target)
    m = read_manifest(out, verify_hashes=True)
    layers = m.config["num_layers"]
    err = max_error(out, ckpt_factory(variant))
    assert err <= ATOL, f"{variant}/{target}: max abs logits diff {err:.3e}"

    # exactly one attention node and (Mixtral) one MoE node per layer, of the op the target prescribes
    attention = "com.microsoft::GroupQueryAttention" if target == "onnxruntime" else "mtx::SlidingWindowGQA"
    moe = "com.microsoft::MoE" if target == "onnxruntime" else "mtx::MoE"
    assert m.attention_op == attention and per_layer(m, attention) == layers
    assert per_layer(m, "mtx::SlidingWindowGQA") + per_layer(m, "com.microsoft::GroupQueryAttention") == layers
    if variant.startswith("mixtral"):
        assert m.moe_op == moe and per_layer(m, moe) == layers
        assert per_layer(m, "mtx::MoE") + per_layer(m, "com.microsoft::MoE") == layers
    else:
        assert m.moe_op is None and per_layer(m, "mtx::MoE") == per_layer(m, "com.microsoft::MoE") == 0
    assert m.fallbacks == []

    window = 0 if variant.endswith("full") else 8
    assert m.window == window
    if target == "onnxruntime":
        assert m.kv.layout == ("ort_window" if window else "ring") and m.kv.past_present == "shared"
        assert m.kv.multi_token_batch == "first_call_only" and m.max_position
        assert m.local_window_size == (window or None)  # ORT >= 1.24 counts the query itself
    else:
        assert m.kv.layout == "ring" and m.kv.multi_token_batch == "any" and m.max_position is None
        assert m.kv.past_present == ("shared" if target == "tensorrt" else "separate")
    if target == "tensorrt":
        assert m.engine is None and m.engine_status.startswith("not built: ")


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
def test_wrong_window_is_detected(exported, ckpt_factory, tmp_path, target):
    """An export whose window is off by one (W+1) fails the same comparison by a wide margin."""
    good = ckpt_factory("mistral")
    wrong = tmp_path / "mistral_w9"
    shutil.copytree(good, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["sliding_window"] = 9
    (wrong / "config.json").write_text(json.dumps(cfg))
    out = exported("mistral_w9", target, checkpoint=wrong, cache_capacity=9)
    assert max_error(out, good, window=8) > 1e-2
    assert max_error(out, good, window=9) <= ATOL  # and it is the window, nothing else


def test_capacity_above_window(exported, ckpt_factory):
    """C > W: ONNX Runtime's windowed cache compacts in steps of C - W + 1; results do not change."""
    out = exported("mistral", "onnxruntime", cache_capacity=13)
    assert read_manifest(out).capacity == 13
    assert max_error(out, ckpt_factory("mistral")) <= ATOL


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
def test_ragged_rows(exported, ckpt_factory, target):
    """Rows at different positions in one call, with row-wise chunks in between (views of the buffers)."""
    folder = ckpt_factory("mixtral4")
    out = exported("mixtral4", target)
    ids = token_ids()
    model = build_model(folder, "float32")
    kv = model.new_kv(2, read_manifest(out).capacity)
    step = ort_stepper(out, 2)
    pos = [0, 0]

    def call(rows: slice, n: int) -> None:
        r = list(range(2))[rows]
        chunk = torch.stack([ids[i, pos[i]:pos[i] + n] for i in r])
        start = torch.tensor([pos[i] for i in r])
        with torch.no_grad():
            ref = model(chunk, start, kv.rows(rows)).numpy()
        got = step(chunk.numpy(), start.numpy(), rows)
        assert np.abs(got - ref).max() <= ATOL
        for i in r:
            pos[i] += n

    call(slice(0, 2), 4)
    call(slice(0, 1), 11)
    call(slice(1, 2), 3)
    for _ in range(10):
        call(slice(0, 2), 1)
    call(slice(0, 2), 3)  # seq > 1 on ragged rows: split per row where the layout requires it


def test_head_size_fallback(exported, tmp_path_factory):
    """Head size 24 (not a multiple of 16): attention keeps the mtx node and function body, said so."""
    folder = make_checkpoint.make_hf(tmp_path_factory.mktemp("hd24"), "mistral", window=8, hidden=48, heads=2,
                                     kv_heads=1, head_dim=24)
    out = exported("hd24", "onnxruntime", checkpoint=folder)
    m = read_manifest(out)
    assert m.attention_op == "mtx::SlidingWindowGQA" and m.ops["mtx::SlidingWindowGQA"] == 2
    assert [f.op for f in m.fallbacks] == ["mtx::SlidingWindowGQA"] and m.fallbacks[0].layers == [0, 1]
    assert "multiple of 16" in m.fallbacks[0].reason
    assert m.kv.layout == "ring" and m.kv.past_present == "separate" and m.max_position is None
    assert max_error(out, folder) <= ATOL


@pytest.mark.parametrize("variant,target", [("mistral", "onnx"), ("sharded", "onnxruntime"), ("tied", "onnx")])
def test_converted_layouts(exported, ckpt_factory, mistral_layout_factory, variant, target):
    """mistral-inference layout (q/k row permutation), sharded per-expert checkpoints, tied embeddings."""
    folder = mistral_layout_factory(variant) if variant == "mistral" else ckpt_factory(variant)
    out = exported(f"{variant}-layout", target, checkpoint=folder)
    assert max_error(out, folder) <= ATOL


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
def test_float16_export(exported, ckpt_factory, target):
    """float16 from a float32 checkpoint: every tensor converted; against the float16 reference model
    (float16 rounding differs in accumulation order only, so the bound is loose)."""
    folder = ckpt_factory("mixtral4")
    out = exported("mixtral4", target, dtype="float16")
    m = read_manifest(out)
    assert m.dtype == "float16" and m.fallbacks == [] and m.weights["referenced_bytes"] == 0
    assert all(s.dtype == "float16" for s in m.inputs[2:] + m.outputs)
    assert m.file("checkpoint-weights") == []
    assert max_error(out, folder) <= 3e-2
