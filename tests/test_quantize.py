"""Quantised exports (docs/ops.md §7) run in ONNX Runtime on CPU against an independent fake-quant oracle.

The oracle is the PyTorch reference model whose quantised weights are replaced by the output of
:func:`np_quantize` below — a numpy transcription of the block rule of docs/ops.md §7, written
independently of mtx.quantize. Sequences are those of test_export_parity.py: batch 2, a chunked
20-token prompt, then 26 decode steps (past 3 wraps of the window of 8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from mtx.exporter.core import export
from mtx.exporter.options import ExportOptions
from mtx.manifest import read_manifest
from mtx.models import build_model
from mtx.parity import run_parity
from mtx.parity.options import ParityOptions

from test_export_parity import SCHEDULE, chunked_logits, exported_logits, token_ids

ATOL = 1e-4


# --------------------------------------------------------------------------------------------------
# The independent oracle: numpy, straight from docs/ops.md §7


def np_quantize(w: np.ndarray, bits: int, bs: int, scheme: str, scale_dtype=np.float32):
    """w [R, K] -> (codes [R, K] uint8, scales [R, kb] in scale_dtype, zero points [R, kb] uint8, ŵ [R, K] float32)."""
    w = w.astype(scale_dtype).astype(np.float32)
    rows, k = w.shape
    kb = -(-k // bs)
    codes = np.zeros((rows, k), np.uint8)
    scales = np.zeros((rows, kb), scale_dtype)
    zeros = np.zeros((rows, kb), np.uint8)
    deq = np.zeros((rows, k), np.float32)
    qmax = 2 ** bits - 1
    for j in range(kb):
        blk = w[:, j * bs:(j + 1) * bs]
        if scheme == "asymmetric":
            lo = np.minimum(blk.min(1), np.float32(0))
            hi = np.maximum(blk.max(1), np.float32(0))
            s = ((hi - lo) / np.float32(qmax)).astype(np.float32).astype(scale_dtype).astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.where(s > 0, np.clip(np.round(-lo / s), 0, qmax), 0)
                u = np.where(s[:, None] > 0, np.clip(np.round(blk / s[:, None]) + z[:, None], 0, qmax), z[:, None])
        else:
            half = 2 ** (bits - 1) - 1
            s = (np.abs(blk).max(1) / np.float32(half)).astype(np.float32).astype(scale_dtype).astype(np.float32)
            z = np.full(rows, 2 ** (bits - 1))
            with np.errstate(divide="ignore", invalid="ignore"):
                u = np.where(s[:, None] > 0, np.clip(np.round(blk / s[:, None]), -half, half) + z[:, None], z[:, None])
        codes[:, j * bs:(j + 1) * bs] = u
        scales[:, j] = s
        zeros[:, j] = z
        deq[:, j * bs:(j + 1) * bs] = (u.astype(np.float32) - np.float32(1) * z[:, None].astype(np.float32)) * s[:, None]
    return codes, scales, zeros, deq


def np_fake_quant(w: torch.Tensor, bits: int, bs: int, scheme: str) -> torch.Tensor:
    flat = w.detach().float().numpy().reshape(-1, w.shape[-1])
    return torch.from_numpy(np_quantize(flat, bits, bs, scheme)[3].reshape(w.shape))


def expected_weights(cfg: dict, target: str, lm_head: bool, embedding: bool = True) -> set[str]:
    """Names of the float tensors a quantised export must replace (independent of the exporter).

    The embedding table is quantised unless ``embedding`` is off; a tied table only when the lm_head is
    quantised too (docs/ops.md §7)."""
    names = set()
    for layer in range(cfg["num_layers"]):
        p = f"layers.{layer}."
        attn = ["attn.wqkv"] if target == "onnxruntime" else ["attn.wq", "attn.wk", "attn.wv"]
        names |= {p + n + ".weight" for n in attn + ["attn.wo"]}
        if cfg["num_experts"]:
            names |= {p + "moe.fc1_swiglu_interleaved", p + "moe.w2"} if target == "onnxruntime" else \
                {p + "moe.w1", p + "moe.w3", p + "moe.w2"}
        else:
            ffn = ["w13", "w2"] if target == "onnxruntime" else ["w1", "w2", "w3"]
            names |= {p + f"ffn.{w}.weight" for w in ffn}
    tied = cfg.get("tie_word_embeddings", False)
    if lm_head and not tied:
        names.add("output.weight")
    if embedding and (lm_head or not tied):
        names.add("embed.weight")
    return names


def oracle_logits(folder: Path, manifest, ids: torch.Tensor, schedule: list[int] = SCHEDULE) -> np.ndarray:
    """Reference model with every listed source replaced by the numpy quantiser's ŵ, fed in ``schedule`` chunks."""
    model = build_model(folder, "float32")
    params = dict(model.named_parameters())
    q = manifest.quantization
    for t in q.tensors:
        for src in t.sources:
            params[src].data = np_fake_quant(params[src].data, t.bits, q.block_size, q.scheme)
    return chunked_logits(model, ids, manifest.capacity, schedule)


@pytest.fixture(scope="module")
def qexport(ckpt_factory, tmp_path_factory):
    cache: dict[tuple, Path] = {}

    def make(variant: str, target: str, **options) -> Path:
        key = (variant, target, tuple(sorted(options.items())))
        if key not in cache:
            if variant.endswith("full"):
                options.setdefault("cache_capacity", 64)
            out = tmp_path_factory.mktemp("quant") / f"{variant}-{target}"
            export(ckpt_factory(variant), out, ExportOptions(target=target, **options))
            cache[key] = out
        return cache[key]

    return make


CASES = [
    ("mistral", "onnxruntime", dict(quantize="int4", accuracy_level=0)),
    ("mistral", "onnxruntime", dict(quantize="int4", accuracy_level=0, embedding_bits=4, block_size=32)),
    ("mistral", "onnx", dict(quantize="int8", quant_scheme="symmetric")),
    ("mistral", "tensorrt", dict(quantize="int4", block_size=64)),
    ("mistral_full", "onnxruntime", dict(quantize="int8", accuracy_level=0, quant_scheme="symmetric")),
    ("mistral_full", "onnx", dict(quantize="int4", lm_head_bits=4, embedding_bits=4)),
    ("mixtral4", "onnxruntime", dict(quantize="int4", accuracy_level=0, block_size=32)),
    ("mixtral4", "onnxruntime", dict(quantize="int8", accuracy_level=0, block_size=32)),
    ("mixtral4", "onnx", dict(quantize="int4", block_size=64, quantize_lm_head=False)),
    ("tied", "onnxruntime", dict(quantize="int4", accuracy_level=0, block_size=32)),
    ("tied", "onnxruntime", dict(quantize="int8", accuracy_level=0, lm_head_bits=4)),
    ("tied", "onnx", dict(quantize="int4", block_size=64, lm_head_bits=4)),
    ("tied", "tensorrt", dict(quantize="int8", quant_scheme="symmetric")),
    ("mistral", "onnxruntime", dict(quantize="int8", accuracy_level=0, quantize_embedding=False)),
]


@pytest.mark.parametrize("variant,target,options", CASES, ids=[f"{v}-{t}-{o['quantize']}-{i}" for i, (v, t, o)
                                                                  in enumerate(CASES)])
def test_exact_against_fake_quant(qexport, ckpt_factory, variant, target, options):
    out = qexport(variant, target, **options)
    m = read_manifest(out, verify_hashes=True)
    folder = ckpt_factory(variant)
    ids = token_ids(m.config["vocab_size"])
    got = exported_logits(out, ids)
    err = float(np.abs(got - oracle_logits(folder, m, ids)).max())
    assert err <= ATOL, f"{variant}/{target}/{options}: max abs logits diff {err:.3e} against the fake-quant oracle"
    # the weights really are quantised: the float model differs by far more than the tolerance
    float_model = build_model(folder, "float32")
    kv = float_model.new_kv(2, m.capacity)
    with torch.no_grad():
        first = float_model(ids[:, :SCHEDULE[0]], torch.zeros(2, dtype=torch.long), kv).numpy()
    assert np.abs(got[:, :SCHEDULE[0]] - first).max() > 1e-2

    q = m.quantization
    assert q.bits == {"int4": 4, "int8": 8}[options["quantize"]] and q.block_size == options.get("block_size", 128)
    lm_head = options.get("quantize_lm_head", True)
    assert {t.weight for t in q.tensors} == expected_weights(m.config, target, lm_head=lm_head,
                                                             embedding=options.get("quantize_embedding", True))
    lm_bits = options.get("lm_head_bits", 8)
    tied = m.config.get("tie_word_embeddings", False)
    head = "embed.weight" if tied else "output.weight"
    embedding_bits = options.get("embedding_bits", 8)
    assert all(t.bits == (lm_bits if t.weight == head else embedding_bits if t.weight == "embed.weight" else q.bits)
               for t in q.tensors)
    assert q.lm_head == any(t.weight == head for t in q.tensors)
    if target == "onnxruntime":
        assert q.accuracy_level == 0 and m.ops["com.microsoft::MatMulNBits"] == sum(
            t.op == "com.microsoft::MatMulNBits" for t in q.tensors) + (tied and q.lm_head)
    else:
        assert q.accuracy_level is None and "com.microsoft::MatMulNBits" not in m.ops
    if variant.startswith("mixtral") and target == "onnxruntime":
        if q.bits == 4:
            assert m.moe_op == "com.microsoft::QMoE" and m.ops["com.microsoft::QMoE"] == m.config["num_layers"]
        else:  # int8 experts with float activations: DequantizeLinear into com.microsoft.MoE, said so
            assert m.moe_op == "com.microsoft::MoE" and [f.op for f in m.fallbacks] == ["com.microsoft::QMoE"]


def test_torch_backend_and_parity_use_the_same_quantised_weights(qexport):
    """mtx parity (reference and --backends torch) on a quantised export: within 1e-4 (fake quant)."""
    out = qexport("mixtral4", "onnxruntime", quantize="int4", accuracy_level=0, block_size=32)
    ckpt = Path(read_manifest(out).checkpoint["path"])
    report = run_parity(ckpt, out, ParityOptions(backends=("onnxruntime", "torch"), steps=30))
    assert report.passed, [(b.name, float(b.logits["max_abs"].max())) for b in report.ran]
    assert max(float(b.logits["max_abs"].max()) for b in report.ran) <= ATOL


def test_accuracy_level_4(qexport, ckpt_factory):
    """The default (int8 activations inside ONNX Runtime): close to the oracle, not exact."""
    out = qexport("mistral", "onnxruntime", quantize="int4")
    m = read_manifest(out)
    assert m.quantization.accuracy_level == 4
    ids = token_ids(m.config["vocab_size"])
    got, ref = exported_logits(out, ids), oracle_logits(ckpt_factory("mistral"), m, ids)
    err = np.abs(got - ref).max(axis=-1)
    assert float(err.max()) <= 0.1 * float(np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# --------------------------------------------------------------------------------------------------
# The graph's initializers against the numpy quantiser


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    out = np.empty((*b.shape[:-1], 2 * b.shape[-1]), np.uint8)
    out[..., 0::2], out[..., 1::2] = b & 0x0F, b >> 4
    return out


def _float_weight(folder: Path, weight: str) -> np.ndarray:
    """The float tensor a graph weight replaces, rebuilt from the reference model (rows concatenated /
    interleaved as docs/ops.md §4 says)."""
    params = {k: v.detach().numpy() for k, v in build_model(folder, "float32").named_parameters()}
    if weight.endswith(".wqkv.weight"):
        return np.concatenate([params[weight.replace("wqkv", w)] for w in ("wq", "wk", "wv")])
    if weight.endswith(".w13.weight"):
        return np.concatenate([params[weight.replace("w13", w)] for w in ("w1", "w3")])
    if weight.endswith(".fc1_swiglu_interleaved"):
        base = weight.removesuffix(".fc1_swiglu_interleaved")
        w1, w3 = params[base + ".w1"], params[base + ".w3"]
        out = np.empty((w1.shape[0], 2 * w1.shape[1], w1.shape[2]), np.float32)
        out[:, 0::2], out[:, 1::2] = w1, w3
        return out
    return params[weight]


@pytest.mark.parametrize("variant,target,options", [
    ("mixtral4", "onnxruntime", dict(quantize="int4", accuracy_level=0, block_size=32)),
    ("mistral", "onnxruntime", dict(quantize="int4", accuracy_level=0, block_size=32)),
    ("mistral", "onnxruntime", dict(quantize="int8", accuracy_level=0, quant_scheme="symmetric")),
    ("tied", "onnxruntime", dict(quantize="int4", accuracy_level=0, block_size=32)),
    ("tied", "onnx", dict(quantize="int4", block_size=64, lm_head_bits=4)),
    ("mixtral4", "onnx", dict(quantize="int4", block_size=64, quantize_lm_head=False)),
    ("mistral", "onnx", dict(quantize="int8", quant_scheme="symmetric")),
    ("mistral_full", "onnx", dict(quantize="int4", lm_head_bits=4)),
])
def test_graph_holds_exactly_the_listed_quantised_tensors(qexport, ckpt_factory, variant, target, options):
    out = qexport(variant, target, **options)
    m = read_manifest(out)
    q = m.quantization
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    # every integer initializer of the graph is a listed code / zero-point tensor, and vice versa
    int_types = {onnx.TensorProto.UINT8, onnx.TensorProto.UINT4, onnx.TensorProto.INT4, onnx.TensorProto.INT8}
    integer = {n for n, t in inits.items() if t.data_type in int_types}
    listed = {n for t in q.tensors for n in (t.codes, t.zero_points) if n}
    assert integer == listed
    consumers: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(f"{n.domain or 'ai.onnx'}::{n.op_type}")
    folder = ckpt_factory(variant)
    for t in q.tensors:
        # the codes feed their op; a tied table's also feed the lm_head's MatMulNBits through a Reshape
        tied_head = t.weight == "embed.weight" and m.config.get("tie_word_embeddings") and target == "onnxruntime"
        assert sorted(consumers[t.codes]) == sorted([t.op] + (["ai.onnx::Reshape"] if tied_head else [])), t.weight
        assert not set(t.sources) & set(inits)  # the float weights are gone
        w = _float_weight(folder, t.weight)
        assert list(w.shape) == t.shape
        k = w.shape[-1]
        codes, scales, zeros, _ = np_quantize(w.reshape(-1, k), t.bits, q.block_size, q.scheme)
        kb = scales.shape[1]
        got_codes = numpy_helper.to_array(inits[t.codes])
        got_scales = numpy_helper.to_array(inits[t.scales]).reshape(-1, kb)
        if t.op == "ai.onnx::DequantizeLinear":
            got_codes = got_codes.astype(np.uint8).reshape(-1, k)
            got_zeros = numpy_helper.to_array(inits[t.zero_points]).astype(np.uint8).reshape(-1, kb)
        else:  # MatMulNBits [N, kb, blob] / QMoE [E, N, kb*blob] / GatherBlockQuantized [N, kb*blob], 4 bits
            # two a byte, low nibble first
            flat = got_codes.reshape(-1, kb * q.block_size * t.bits // 8)
            got_codes = (_unpack_nibbles(flat) if t.bits == 4 else flat)[:, :k]
            if t.zero_points is None:
                got_zeros = np.full_like(zeros, 2 ** (t.bits - 1))
            else:
                z = numpy_helper.to_array(inits[t.zero_points])
                z = z.reshape(-1, z.shape[-1])
                got_zeros = (_unpack_nibbles(z) if t.bits == 4 else z)[:, :kb]
        np.testing.assert_array_equal(got_codes, codes, err_msg=t.weight)
        np.testing.assert_array_equal(got_scales, scales, err_msg=t.weight)
        np.testing.assert_array_equal(got_zeros, zeros, err_msg=t.weight)


def test_short_last_block_is_padded(tmp_path):
    """K = 96 with blocks of 64: MatMulNBits pads the last block (docs/ops.md §7); exact against the oracle."""
    from mtx import synthetic_checkpoints as make_checkpoint

    folder = make_checkpoint.make_hf(tmp_path / "ck", "mistral", window=8, intermediate=96)
    out = tmp_path / "out"
    export(folder, out, ExportOptions(quantize="int4", block_size=64, accuracy_level=0))
    m = read_manifest(out)
    down = next(t for t in m.quantization.tensors if t.weight == "layers.0.ffn.w2.weight")
    assert down.shape == [64, 96]
    ids = token_ids(m.config["vocab_size"])
    assert float(np.abs(exported_logits(out, ids) - oracle_logits(folder, m, ids)).max()) <= ATOL


# --------------------------------------------------------------------------------------------------
# Bad options: one line, exit 2


@pytest.mark.parametrize("args,needle", [
    (["--quantize", "int3"], "--quantize"),
    (["--quantize", "int4", "--block-size", "7"], "--block-size"),
    (["--quantize", "int4", "--accuracy-level", "2"], "--accuracy-level"),
    (["--quantize", "int4", "--dtype", "bfloat16"], "--quantize"),
    (["--quantize", "int4", "--embedding-bits", "2"], "--embedding-bits"),
])
def test_bad_options(run_mtx, ckpt_factory, tmp_path, args, needle):
    res = run_mtx("export", str(ckpt_factory("mistral")), "-o", str(tmp_path / "out"), *args)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtx: error: ") and needle in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_block_that_does_not_fit_the_experts(run_mtx, ckpt_factory, tmp_path):
    """QMoE has no short blocks: hidden size 64 with blocks of 128 (the default) is refused, naming the
    option and tensor."""
    res = run_mtx("export", str(ckpt_factory("mixtral4")), "-o", str(tmp_path / "out"), "--quantize", "int4")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--block-size" in lines[0] and "moe" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*out*"))


# --------------------------------------------------------------------------------------------------
# mtx parity --quality


def _ppl(logits: np.ndarray, ids: np.ndarray) -> float:
    lp = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_quality_mode(qexport, ckpt_factory, tmp_path):
    """Perplexities and top-1 agreement: reference from transformers (float), export from the numpy oracle."""
    from conftest import hf_logits
    from mtx.parity.quality import run_quality

    folder = ckpt_factory("mixtral4")
    out = qexport("mixtral4", "onnxruntime", quantize="int4", accuracy_level=0, block_size=32)
    ids = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(5))
    text = tmp_path / "held_out.txt"
    text.write_text(" ".join(f"w{i}" for i in ids[0].tolist()))
    q = run_quality(folder, out, text)
    assert q.tokens == 149 and q.quantization["bits"] == 4
    ref = hf_logits(folder, ids)[0].numpy()
    quant = oracle_logits(folder, read_manifest(out), ids, schedule=[64, 64, 22])[0]
    n = ids[0].numpy()
    assert q.reference_perplexity == pytest.approx(_ppl(ref, n), rel=1e-4)
    assert q.export_perplexity == pytest.approx(_ppl(quant, n), rel=1e-4)
    assert q.export_perplexity != pytest.approx(q.reference_perplexity, rel=1e-3)
    assert q.top1_agreement == pytest.approx(float((ref[:-1].argmax(-1) == quant[:-1].argmax(-1)).mean()), abs=1e-9)
