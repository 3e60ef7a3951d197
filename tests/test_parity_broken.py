"""``mtx parity`` must fail (exit 1) on broken artifacts and say why.

Each broken artifact is a correct export edited by graph surgery (onnx / onnx-ir) in the test; the
manifest's size and sha256 of model.onnx are updated so the folder is self-consistent. Parity is
not told what was broken: the diagnosis comes from where the errors are, against the PyTorch
reference built from the (unbroken) checkpoint.

(a) window off by one: ``window`` W+1 on the mtx attention nodes (onnx target); ``local_window_size``
    W-1 on GroupQueryAttention (onnxruntime target; W+1 would not fit ORT's buffer of C = W).
(b) KV buffer written before it is read: every attention node reads the buffer *after* its chunk was
    written (a duplicate node computes the present buffers and feeds them in as the past ones).
(c) router in reduced precision: router logits rounded to float16 before the softmax/top-k, on a
    Mixtral whose layer-1 router has two nearly equal rows (experts 1 and 2 nearly tied).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mtx.cli import main
from mtx.parity import ParityOptions, run_parity

W = 8  # the tiny checkpoints' window (and capacity)


def edited_export(src: Path, dst: Path, edit: Callable[[ir.Model], None]) -> Path:
    """Copy export ``src`` to ``dst`` and apply ``edit`` to its graph (external data untouched)."""
    shutil.copytree(src, dst)
    path = dst / "model.onnx"
    model = ir.serde.deserialize_model(onnx.load(str(path), load_external_data=False))
    edit(model)
    onnx.save(ir.serde.serialize_model(model), str(path))
    manifest = json.loads((dst / "mtx.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "model.onnx":
            entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (dst / "mtx.json").write_text(json.dumps(manifest, indent=2))
    return dst


def nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op_type]


def shift_attribute(op_type: str, name: str, delta: int) -> Callable[[ir.Model], None]:
    def edit(model: ir.Model) -> None:
        found = nodes(model, op_type)
        assert found, f"no {op_type} node"
        for n in found:
            n.attributes[name] = ir.AttrInt64(name, n.attributes[name].value + delta)
    return edit


def attend_after_write(model: ir.Model) -> None:
    """Each mtx::SlidingWindowGQA reads the buffers its chunk was already written to."""
    found = nodes(model, "SlidingWindowGQA")
    assert found
    for n in found:
        written = ir.Node(n.domain, n.op_type, list(n.inputs), list(n.attributes.values()), num_outputs=3)
        model.graph.insert_before(n, written)
        n.replace_input_with(3, written.outputs[1])
        n.replace_input_with(4, written.outputs[2])


def router_logits_float16(model: ir.Model) -> None:
    """Round the router logits to float16 before the routing softmax (whose result feeds TopK)."""
    found = [sm for sm in nodes(model, "Softmax") if any(u.node.op_type == "TopK" for u in sm.outputs[0].uses())]
    assert found
    for sm in found:
        to16 = ir.Node("", "Cast", [sm.inputs[0]], [ir.AttrInt64("to", ir.DataType.FLOAT16)])
        to32 = ir.Node("", "Cast", [to16.outputs[0]], [ir.AttrInt64("to", ir.DataType.FLOAT)])
        model.graph.insert_before(sm, [to16, to32])
        sm.replace_input_with(0, to32.outputs[0])


@pytest.fixture(scope="module")
def tied_mixtral(ckpt_factory, tmp_path_factory) -> Path:
    """mixtral4 with layer 1's router row 2 = row 1 + 1e-4·u: experts 1 and 2 nearly tied for every token."""
    folder = tmp_path_factory.mktemp("tied") / "mixtral-tied"
    shutil.copytree(ckpt_factory("mixtral4"), folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.gate.weight"
    gate = tensors[name].clone()
    gate[2] = gate[1] + 1e-4 * torch.randn(gate.shape[1], generator=torch.Generator().manual_seed(2)) / 8
    tensors[name] = gate
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def parity_cli(ckpt: Path, out: Path, *args: str) -> tuple[int, dict]:
    """``mtx parity CKPT OUT --json ARGS`` in this process: (exit code, the JSON object)."""
    result = CliRunner().invoke(main, ["parity", str(ckpt), str(out), "--json", *args])
    assert result.stderr == "", result.stderr
    return result.exit_code, json.loads(result.stdout)


def diagnosis_of(data: dict, backend: str = "onnxruntime") -> dict:
    return data["backends"][backend]["diagnosis"]


@pytest.mark.parametrize("target,op,attr,delta", [("onnx", "SlidingWindowGQA", "window", +1),
                                                   ("onnxruntime", "GroupQueryAttention", "local_window_size", -1)])
def test_window_off_by_one(parity_export, ckpt_factory, tmp_path, target, op, attr, delta):
    ckpt = ckpt_factory("mistral")
    broken = edited_export(parity_export("mistral", target), tmp_path / "broken", shift_attribute(op, attr, delta))
    onset = W if delta > 0 else W + delta  # W+1: position W sees key 0; W-1: position W-1 misses key 0
    for per_layer in ([], ["--per-layer"]):
        code, data = parity_cli(ckpt, broken, *per_layer)
        assert code == 1 and data["passed"] is False
        d = diagnosis_of(data)
        assert d["code"] == "window_off_by_one" and d["first_position"] == onset, d["line"]
        assert "window off by one" in d["line"]
        assert (f"exactly at position {W} = W" if delta > 0 else f"attends to only {onset} keys") in d["line"]
        steps = data["backends"]["onnxruntime"]["steps"]
        assert all(s["within_tolerance"] for s in steps[:onset]) and not steps[onset]["within_tolerance"]
        if per_layer:
            assert (d["layer"], d["stage"]) == (0, "attention") and d["line"].startswith("layer 0 attention output")


def test_buffer_written_before_read(parity_export, ckpt_factory, tmp_path):
    ckpt = ckpt_factory("mistral")
    broken = edited_export(parity_export("mistral", "onnx"), tmp_path / "broken", attend_after_write)
    code, data = parity_cli(ckpt, broken, "--per-layer")
    assert code == 1
    d = diagnosis_of(data)
    assert d["code"] == "kv_written_before_read" and (d["layer"], d["stage"]) == (0, "attention"), d["line"]
    assert "KV buffer written before it is read" in d["line"] and "single-token decode steps match" in d["line"]
    assert d["evidence"]["chunk_only"] and d["evidence"]["last_token_of_chunk_matches"]
    # the chunk that first writes over a resident key (position 8 into slot 0) starts at 6; earlier positions match
    assert d["first_position"] == 6 and d["evidence"]["onset_call"] == [6, 8]
    layer0 = data["backends"]["onnxruntime"]["layers"][0]["after_attention"]
    assert layer0["first_failing_position"] == 6

    report = run_parity(ckpt, broken, ParityOptions())  # from the logits alone
    (res,) = report.ran
    assert res.finding.code == "kv_written_before_read" and not report.passed
    assert "decode steps fail only until the prefilled keys leave the window" in res.finding.line


def test_router_in_float16(parity_export, tied_mixtral, tmp_path):
    good = parity_export("mixtral-tied", "onnxruntime", checkpoint=tied_mixtral)
    code, data = parity_cli(tied_mixtral, good, "--per-layer")
    assert code == 0 and diagnosis_of(data)["code"] == "match"  # near ties alone do not fail a correct export

    broken = edited_export(good, tmp_path / "broken", router_logits_float16)
    code, data = parity_cli(tied_mixtral, broken, "--per-layer")
    assert code == 1
    d = diagnosis_of(data)
    assert d["code"] == "router_precision" and (d["layer"], d["stage"]) == (1, "moe"), d["line"]
    assert "router decisions differ: router softmax/top-k not in float32" in d["line"]
    router = d["evidence"]["router"]
    assert router["tokens"] >= 2 and router["near_tied_share"] >= 0.5 and d["evidence"]["top1_flips"] >= 1
    assert router["margin_at_tokens"] < 0.01 * router["margin_median"]
    assert data["backends"]["onnxruntime"]["summary"]["top1_agreement"] < 1

    report = run_parity(tied_mixtral, broken, ParityOptions())  # from the logits alone
    (res,) = report.ran
    assert res.finding.code == "router_precision" and res.finding.line.startswith("likely layer 1: ")


def test_polygraphy_comparison_fails_on_a_broken_backend(parity_export, ckpt_factory, tmp_path):
    """onnxruntime (broken graph) vs torch (the PyTorch model in the export dtype): Polygraphy flags the
    calls where they disagree, from the first call that holds position W."""
    broken = edited_export(parity_export("mistral", "onnx"), tmp_path / "broken",
                           shift_attribute("SlidingWindowGQA", "window", +1))
    code, data = parity_cli(ckpt_factory("mistral"), broken, "--backends", "onnxruntime,torch")
    assert code == 1
    assert data["backends"]["torch"]["passed"] is True and data["backends"]["onnxruntime"]["passed"] is False
    (pair,) = data["comparisons"]
    assert pair["tool"] == "polygraphy" and pair["passed"] is False
    assert pair["first_failed_call_start"] == 6 and pair["max_absdiff"] > 1e-2  # call 6-8 holds position 8


def test_artifact_that_fails_to_run(parity_export, ckpt_factory, tmp_path):
    """local_window_size W+1 does not fit ONNX Runtime's buffer of C = W slots: ORT refuses to run it.
    That is a failed check (exit 1) reported in one line, not bad input."""
    broken = edited_export(parity_export("mistral", "onnxruntime"), tmp_path / "broken",
                           shift_attribute("GroupQueryAttention", "local_window_size", +1))
    result = CliRunner().invoke(main, ["parity", str(ckpt_factory("mistral")), str(broken)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtx: error: onnxruntime failed on the prefill call at positions "
                                                   "0-2: "), result.stderr
    assert "local_window_size" in lines[0]
